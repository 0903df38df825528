"""A model card (README.md, Hugging Face convention) beside every checkpoint, so it explains itself.

    ---
    base_model: HuggingFaceTB/SmolLM2-135M-Instruct
    pipeline_tag: text-generation
    library_name: transformers
    tags: [compress-suite, pruned, distilled, onnx, quantized, ort-int8-dynamic]
    ---
    # quickstart / 04-quantize
    lineage: source -> 01-prune (ratio=0.25, ...) -> ... ; benchmark figures when measured; how to load it

The card is written after the checkpoint is finished (renamed into place) and rewritten once the benchmarks
ran, so it is not in the manifest's file table: `checkpoint.verify` leaves `README.md` (MODEL_CARD) out of
its "unlisted files" check, and no loader reads it. Writing a card never fails a run."""
from __future__ import annotations

import json
import os
from pathlib import Path

from .checkpoint import MANIFEST, MODEL_CARD, MODEL_CARD_TMP, read_manifest
from .describe import options_line, stored_options

PIPELINE_TAG = {"causal-lm": "text-generation", "sequence-classification": "text-classification",
                "feature-extraction": "feature-extraction"}
# builtin model sources -> the hub ids of the models their packages ship
BUILTIN_HUB_IDS = {"builtin:smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct",
                   "builtin:minilm-l6": "sentence-transformers/all-MiniLM-L6-v2"}
# quality figures shown, and whether a ratio to the source means something for each
_QUALITY = {"perplexity": True, "top1_agreement": False, "kl": False, "accuracy": True, "macro_f1": True,
            "label_agreement": False, "cosine": False, "nn_agreement": False}
_PASS_TAGS = {"prune": "pruned", "distill": "distilled", "lowrank": "low-rank", "export": "onnx",
              "quantize": "quantized"}


def base_model_id(source: str) -> str | None:
    """The hub id of a model source when it has one (builtin packages, hf:<id>), else None."""
    if source in BUILTIN_HUB_IDS:
        return BUILTIN_HUB_IDS[source]
    if source.startswith("hf:"):
        return source[3:]
    return None


def parent_dir(ckpt: Path, parent_path: str) -> Path | None:
    """The parent checkpoint's folder: as recorded, else beside this one (a run folder that was moved)."""
    for cand in (Path(parent_path), ckpt.parent / Path(parent_path).name,
                 ckpt.parent.parent / Path(parent_path).name):
        if (cand / MANIFEST).is_file():
            return cand
    return None


def ancestors(path: str | os.PathLike):
    """Yields (folder, manifest) for the checkpoint at `path` and each parent up its lineage, nearest first,
    ending at the first step whose parent is not a checkpoint folder (the source model, or a folder gone)."""
    seen: set[Path] = set()
    current: Path | None = Path(path)
    while current is not None and current.resolve() not in seen:
        seen.add(current.resolve())
        manifest = read_manifest(current)
        yield current, manifest
        parent = (manifest.get("parent") or {}).get("path")
        current = parent_dir(current, parent) if parent and parent != manifest.get("source") else None


def lineage(path: str | os.PathLike) -> tuple[str, list[dict]]:
    """(the source model, [{step, pass, options} ...] from the first pass to this checkpoint)."""
    steps: list[dict] = []
    source = last_parent = ""
    for folder, manifest in ancestors(path):
        p = manifest.get("pass") or {}
        steps.append({"step": folder.name, "pass": p.get("name", "?"), "options": p.get("config") or {},
                      "info": manifest.get("info") or {}})
        source = manifest.get("source") or source
        last_parent = (manifest.get("parent") or {}).get("path") or ""
    return source or last_parent, steps[::-1]


def _front_matter(fields: dict) -> str:
    import yaml

    return "---\n" + yaml.safe_dump(fields, sort_keys=False, default_flow_style=None, width=1000) + "---\n"


def _times(ratio: float, more: str, less: str) -> str:
    """`2.50x faster`, or for a ratio under 1 `1.25x slower`: never `0.80x faster`."""
    return f"{ratio:.2f}x {more}" if ratio >= 1 else f"{1 / ratio:.2f}x {less}"


def _fmt(v, digits=2) -> str:
    return "-" if v is None else f"{v:,.{digits}f}"


def _figures(records: list[dict], reference: dict | None) -> list[str]:
    """Markdown table rows of this checkpoint's benchmark records (one per backend), with ratios to the source."""
    def q(r):
        quality = r.get("quality") or {}
        return {k: quality[k] for k in _QUALITY if isinstance(quality.get(k), (int, float))}

    def speed(r):
        lat = r.get("latency") or {}
        if lat.get("decode_tokens_per_s"):
            return "decode tok/s", lat["decode_tokens_per_s"], True
        b1 = (lat.get("batch1") or {}).get("median_ms")
        return ("batch-1 ms", b1, False) if b1 else (None, None, None)

    rows = ["| backend | size (MB) | quality | speed |", "|---|---|---|---|"]
    for r in records:
        size = r.get("size_bytes")
        ref_size = (reference or {}).get("size_bytes")
        size_text = _fmt(size / 1e6, 1) if size else "-"
        if size and ref_size:
            size_text += f" ({_times(ref_size / size, 'smaller', 'larger')})"
        ref_q = q(reference or {})
        quality = ", ".join(f"{k} {v:.4g}" + (f" ({v / ref_q[k]:.3f}x)" if ref_q.get(k) and _QUALITY[k] else "")
                            for k, v in q(r).items()) or "-"
        name, value, higher = speed(r)
        speed_text = "-"
        if name:
            speed_text = f"{name} {value:.4g}"
            _, ref_value, _ = speed(reference or {})
            if ref_value:
                speed_text += f" ({_times(value / ref_value if higher else ref_value / value, 'faster', 'slower')})"
        rows.append(f"| {r.get('backend', '-')} | {size_text} | {quality} | {speed_text} |")
    return rows


def card_text(path: str | os.PathLike, *, records: list[dict] | None = None, reference: dict | None = None,
              run_name: str | None = None) -> str:
    """The README.md of the checkpoint at `path`; `records`: its benchmark records (from results.json),
    `reference`: the record its ratios are taken against (the source on the first backend)."""
    path = Path(path)
    manifest = read_manifest(path)
    source, steps = lineage(path)
    tags = ["compress-suite"]
    for s in steps:
        tag = _PASS_TAGS.get(s["pass"])
        if tag and tag not in tags:
            tags.append(tag)
    quant = manifest.get("quantization") or {}
    if quant.get("method"):
        tags.append(str(quant["method"]))
    if quant.get("bits") in (4, 8) and f"int{quant['bits']}" not in tags:
        tags.append(f"int{quant['bits']}")
    if manifest.get("kind") == "onnx" and "onnx" not in tags:
        tags.append("onnx")
    fields: dict = {}
    base = base_model_id(source)
    if base:
        fields["base_model"] = base
    fields["pipeline_tag"] = PIPELINE_TAG.get(manifest.get("task"), manifest.get("task"))
    stock = manifest.get("kind") == "torch" and not manifest.get("structure")
    if manifest.get("kind") == "onnx" or stock:  # else only compress.load rebuilds it: no library loads it as is
        fields["library_name"] = "onnx" if manifest.get("kind") == "onnx" else "transformers"
    fields["tags"] = tags
    step = f"{path.parent.name}/{path.name}" if run_name and path.parent.name != run_name else path.name  # branch
    title = f"{run_name} / {step}" if run_name else path.name
    lines = [_front_matter(fields), f"# {title}", "",
             f"{'A torch' if manifest.get('kind') == 'torch' else 'An ONNX'} checkpoint ({manifest.get('task')}), "
             "made by compress-suite from "
             f"`{source}`" + (f" ({base})" if base and base != source else "") + ".", "", "## Lineage", "",
             f"- source: `{source}`"]
    for s in steps:
        options = options_line(stored_options(s["pass"], s["options"]), max_len=100_000)  # a card shows them all
        line = f"- `{s['step']}`: **{s['pass']}** ({options})"
        lines.append(line)
    lines.append("")
    if records:
        lines += ["## Benchmark", ""]
        if reference is not None:
            lines += [f"Ratios against `{reference.get('label', 'source')}` on {reference.get('backend')}.", ""]
        lines += _figures(records, reference) + [""]
    lines += ["## Use", "", "```python", "import compress", f'art = compress.load("path/to/{path.name}")'
              + ("  # art.model: the torch model, art.tokenizer" if manifest.get("kind") == "torch" else
                 "  # art.onnx_dir: model.onnx + tokenizer (compress.edge runs it with onnxruntime only)"),
              "```", ""]
    if stock:
        lines += ["A stock architecture: `AutoModel*.from_pretrained(folder, dtype=\"auto\")` loads it too.", ""]
    elif manifest.get("kind") == "torch":
        kinds = ", ".join(sorted({str(e.get("type", "?")) for e in manifest.get("structure") or []}))
        lines += [f"Not a stock architecture ({kinds}): load it with `compress.load`, which re-applies that "
                  "structure; a plain `from_pretrained` would initialise those layers at random.", ""]
    else:
        # run from the folder holding the checkpoint: the runner is inside it and takes it as its argument
        lines += ["Without the suite (onnxruntime, numpy and tokenizers only), from the folder holding this one:", "",
                  "```bash", "pip install onnxruntime numpy tokenizers",
                  f'python {path.name}/edge_runner.py {path.name} "your text"', "```", ""]
    lines += [f"`{MANIFEST}` lists every file with its sha256; `compress.load` verifies them. This card is not "
              "part of that list and may be edited.", ""]
    return "\n".join(lines)


def write_card(path: str | os.PathLike, **kwargs) -> Path | None:
    """Write README.md into the finished checkpoint at `path`; None (and nothing written) on any problem."""
    path = Path(path)
    try:
        text = card_text(path, **kwargs)
        tmp = path / MODEL_CARD_TMP  # verify ignores it: a run killed here leaves a checkpoint still reusable
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path / MODEL_CARD)
        return path / MODEL_CARD
    except Exception:  # a card is documentation: it never fails a run
        return None


def write_cards(paths: list[str | os.PathLike], results: str | os.PathLike | None = None,
                run_name: str | None = None) -> list[Path]:
    """Cards for every checkpoint in `paths`, with their figures from a results.json when there is one."""
    records: list[dict] = []
    if results is not None and Path(results).is_file():
        try:
            records = json.loads(Path(results).read_text()).get("records") or []
        except (ValueError, OSError):
            records = []
    measured = [r for r in records if "skipped" not in r and "error" not in r]
    reference = next((r for r in measured if r.get("is_baseline")), None)
    out = []
    for p in paths:
        p = Path(p)
        mine = [r for r in measured if r is not reference and _same(r.get("target"), p)]
        written = write_card(p, records=mine, reference=reference, run_name=run_name)
        if written:
            out.append(written)
    return out


def _same(target, path: Path) -> bool:
    if not target:
        return False
    try:
        return Path(target).resolve() == path.resolve()
    except OSError:
        return False
