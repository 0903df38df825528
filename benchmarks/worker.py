"""One measurement in a fresh process: `python -m benchmarks.worker SPEC.json OUT.json` (SPEC.json: a
`WorkerSpec`, benchmarks/worker_spec.py).

The parent (benchmarks/harness.py) prepares the inputs (token ids as .npz) so this process loads nothing
but the model and its runtime: the ORT worker never imports torch, and the peak memory read from this
process's own VmHWM is the model's and its workload's alone."""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from . import metrics
from .latency import decoder_latency, encoder_latency
from .worker_spec import WorkerSpec


def _status_mb(field: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


def _bar(total: int, desc: str, show: bool):
    if not show:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True, file=sys.stderr)


_REF_ARRAYS = ("top1", "topk_idx", "topk_logp")


def _lm_quality(backend, tokens, window: int, stride: int, spec: WorkerSpec, ref, bar) -> tuple[dict, dict]:
    """Scores every perplexity window of `tokens`; returns (quality figures, reference arrays to save).
    `ref`: the baseline's arrays for these tokens (top1, topk_idx, topk_logp), or None."""
    s = spec.settings
    windows = metrics.ppl_windows(len(tokens), window, stride)
    n_targets = sum(e - f for _, e, f in windows)
    want_ref = spec.write_reference is not None
    self_ref = spec.self_reference  # the baseline itself: compare with its own outputs
    if ref is not None and ref["top1"].shape != (n_targets,):
        raise RuntimeError("the baseline was scored on other tokens: its eval data or tokenizer differs")
    parts, offset, i = [], 0, 0
    while i < len(windows):  # batch consecutive windows of equal length
        group = [windows[i]]
        while (len(group) < s["eval_batch"] and i + len(group) < len(windows)
               and windows[i + len(group)][1] - windows[i + len(group)][0] == group[0][1] - group[0][0]):
            group.append(windows[i + len(group)])
        ids = np.stack([tokens[b:e] for b, e, _ in group]).astype(np.int64)
        logits = backend.logits(ids, np.ones_like(ids))
        for row, (b, e, first) in zip(logits, group):
            n = e - first
            r = (ref["topk_idx"][offset:offset + n], ref["topk_logp"][offset:offset + n]) if ref is not None else \
                "self" if self_ref else None
            parts.append(metrics.score_window(row, tokens, b, e, first, s["kl_top_k"] if want_ref else None, r))
            offset += n
        i += len(group)
        if bar is not None:
            bar.update(len(group))
    scores = metrics.concat_scores(parts)
    quality = {"perplexity": metrics.perplexity(scores.nll), "nll": float(scores.nll.mean()),
               "scored_tokens": int(scores.nll.size), "windows": len(windows)}
    if ref is not None or self_ref:
        quality["top1_agreement"] = metrics.agreement(scores.top1, scores.top1 if self_ref else ref["top1"])
        quality["kl"] = float(scores.kl.mean())
    refs = {"top1": scores.top1, "topk_idx": scores.topk_idx, "topk_logp": scores.topk_logp} if want_ref else {}
    return quality, refs


def _lm_corpora(backend, inputs, spec: WorkerSpec) -> tuple[dict, dict]:
    """The eval tokens, then (with `spec.extra_data`) each extra corpus, windowed by its own seq_len. The
    extra corpora's figures go under quality["extra_data"][name], their reference arrays under "extra.<name>."."""
    s = spec.settings
    corpora = [(None, inputs["tokens"], s["window"], s["stride"])]
    if spec.extra_data:
        corpora += [(name, inputs[f"extra.{name}"], d["seq_len"], d["seq_len"])
                    for name, d in (s.get("extra_data") or {}).items()]
    ref = np.load(spec.reference) if spec.reference else None
    quality, refs = {}, {}
    for name, tokens, window, stride in corpora:
        prefix = f"extra.{name}." if name else ""
        corpus_ref = {k: ref[prefix + k] for k in _REF_ARRAYS} if ref is not None else None
        bar = _bar(len(metrics.ppl_windows(len(tokens), window, stride)),
                   f"quality {spec.label}" + (f" ({name})" if name else ""), spec.show_progress)
        q, r = _lm_quality(backend, tokens, window, stride, spec, corpus_ref, bar)
        if bar is not None:
            bar.close()
        if name:
            quality.setdefault("extra_data", {})[name] = q
        else:
            quality.update(q)
        refs.update({prefix + k: v for k, v in r.items()})
    return quality, refs


def _generations(backend, gen: dict) -> list[list[int]]:
    """Each prompt's greedy continuation (token ids, EOS included when reached), batch 1."""
    return [backend.generate(np.asarray([ids], dtype=np.int64), gen["new_tokens"], gen["eos"])
            for ids in gen["prompts"]]


def _batches(inputs, batch: int):
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    for start in range(0, len(ids), batch):
        m = mask[start:start + batch]
        width = int(m.sum(1).max())  # trim the padding this batch does not need (the harness pads on the right)
        yield ids[start:start + batch, :width], m[:, :width]


def _encoder_quality(backend, inputs, spec: WorkerSpec) -> tuple[dict, dict]:
    s, task = spec.settings, spec.task
    ref = np.load(spec.reference) if spec.reference else None
    outs = []
    bar = _bar(len(inputs["input_ids"]), f"quality {spec.label}", spec.show_progress)
    for ids, mask in _batches(inputs, s["eval_batch"]):
        outs.append(backend.embed(ids, mask) if task == "feature-extraction" else backend.logits(ids, mask))
        if bar is not None:
            bar.update(len(ids))
    if bar is not None:
        bar.close()
    out = np.concatenate(outs)
    if spec.self_reference:  # the baseline itself: compare with its own outputs
        ref = {"embeddings": out, "pred": out.argmax(-1) if out.ndim == 2 else None}
    quality: dict = {"examples": int(len(out))}
    if task == "feature-extraction":
        if ref is not None:
            cos = metrics.cosine(out, ref["embeddings"])
            quality.update(cosine=float(cos.mean()), cosine_min=float(cos.min()),
                           nn_agreement=metrics.agreement(metrics.nearest_neighbours(out),
                                                          metrics.nearest_neighbours(ref["embeddings"])))
        return quality, {"embeddings": out}
    pred = out.argmax(-1)
    if "labels" in inputs.files:
        acc, f1 = metrics.accuracy_f1(pred, inputs["labels"], out.shape[-1])
        quality.update(accuracy=acc, macro_f1=f1)
    if ref is not None:
        quality["label_agreement"] = metrics.agreement(pred, ref["pred"])
    return quality, {"pred": pred}


def _longest_sequence(spec: WorkerSpec) -> int:
    """Tokens in the longest sequence this measurement feeds the model (a scoring window, the latency prompt
    and its new tokens, a generation prompt and its new tokens)."""
    s, lat, gen = spec.settings, spec.settings.get("latency"), spec.generate
    lengths = [s.get("window") or 0, *(d["seq_len"] for d in (s.get("extra_data") or {}).values())]
    if lat:
        lengths.append(lat["prompt_tokens"] + lat["new_tokens"])
    if gen:
        lengths += [len(ids) + gen["new_tokens"] for ids in gen["prompts"]]
    return max(lengths)


def run(spec: WorkerSpec) -> dict:
    s, task, show = spec.settings, spec.task, spec.show_progress
    start = time.perf_counter()
    from .backends import open_backend

    backend = open_backend(spec.target, spec.loader, task, spec.backend, s["threads"], _longest_sequence(spec))
    load_s = time.perf_counter() - start
    rss_loaded = _status_mb("VmRSS")
    inputs = np.load(spec.inputs)
    record: dict = {"load_s": load_s, "params": backend.params, "dtype": backend.dtype,
                    "providers": backend.providers}
    # Latency first: the peak RSS read right after it is the model plus the latency workload, what a
    # deployment would need; scoring quality holds large logit arrays and is reported separately.
    lat = s.get("latency")
    if lat and spec.latency:
        bar = _bar(lat["repeats"] * (1 if task == "causal-lm" else 2), f"latency {spec.label}", show)
        try:
            if task == "causal-lm":
                record["latency"] = decoder_latency(backend, inputs["prompt"], lat["new_tokens"], lat["warmup"],
                                                    lat["repeats"], bar)
            else:
                record["latency"] = encoder_latency(backend, task, inputs["lat_ids"], inputs["lat_mask"],
                                                    lat["throughput_batch"], lat["warmup"], lat["repeats"], bar)
        except ValueError as exc:  # e.g. an ONNX decoder exported without past key values cannot decode
            record["latency_error"] = str(exc)
        if bar is not None:
            bar.close()
    memory = {"peak_rss_mb": _status_mb("VmHWM"), "rss_after_load_mb": rss_loaded,
              "cuda_peak_allocated_mb": backend.cuda_peak_mb()}
    if spec.generate:  # after the peak RSS read: a few short sequences, not part of the timed workload
        try:
            record["generated_ids"] = _generations(backend, spec.generate)
        except ValueError as exc:  # e.g. an ONNX decoder exported without past key values
            record["generations_error"] = str(exc)
    quality, refs = {}, {}
    if spec.quality:
        score = _lm_corpora if task == "causal-lm" else _encoder_quality
        quality, refs = score(backend, inputs, spec)
    if spec.write_reference:
        np.savez(spec.write_reference, **refs)
    record["quality"] = quality
    memory.update(peak_rss_with_quality_mb=_status_mb("VmHWM"), torch_imported="torch" in sys.modules)
    record["memory"] = memory
    record["worker_s"] = time.perf_counter() - start
    return record


def main(argv: list[str]) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from compress.logs import capture_from_env  # other libraries' notices into the run's log, as the parent

    try:
        with capture_from_env():
            record = run(WorkerSpec.from_json(Path(argv[0]).read_text()))
    except Exception as exc:  # reported in the record: the parent turns it into an error record
        import traceback

        record = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-4000:]}
    tmp = Path(argv[1] + ".tmp")
    tmp.write_text(json.dumps(record, default=float))
    tmp.replace(argv[1])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
