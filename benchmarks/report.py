"""Reports from benchmark records: results.json, report.md, a self-contained report.html and PNG plots.

Everything is derived from the records alone, so `compress report RUN_DIR` rebuilds the same files
(byte for byte) from results.json. Each row is one checkpoint on one backend, in the order given (pipeline
order); every figure comes with its ratio to the baseline (the source model, or the step that
`benchmark.baseline` names) on the same backend."""
from __future__ import annotations

import base64
import html
import json
from pathlib import Path

from .plots import QUALITY_AXIS, scatter
from .roofline import percent_of_bound

RESULTS = "results.json"


def _get(r: dict, *path):
    for p in path:
        if not isinstance(r, dict) or p not in r or r[p] is None:
            return None
        r = r[p]
    return r


def _fmt(v, digits: int) -> str:
    return "-" if v is None else f"{v:,.{digits}f}"


def _cell(v, base, digits: int) -> str:
    if v is None:
        return "-"
    ratio = f" ({v / base:.2f}x)" if base not in (None, 0) else ""
    return _fmt(v, digits) + ratio


def _perplexity(r):
    return _get(r, "quality", "perplexity")


def _accuracy(r):
    return _get(r, "quality", "accuracy")


def _cosine(r):
    return _get(r, "quality", "cosine")


def _batch1_ms(r):
    return _get(r, "latency", "batch1", "median_ms")


def _decode_tok_s(r):
    return _get(r, "latency", "decode_tokens_per_s")


def _bound_percent(r):
    """Decode speed as a share of memory bandwidth / weight bytes read per token (benchmarks/roofline.py). A
    decode step reads the weights once for the whole batch: steps per second, not tokens, meet the bound."""
    tok_s, batch = _decode_tok_s(r), _get(r, "latency", "batch") or 1
    return percent_of_bound(tok_s / batch if tok_s else None, r.get("weight_bytes_per_token"),
                            _get(r, "machine", "memory_bandwidth_gb_s"))


# (header, getter, digits, with ratio) per task
_COMMON_HEAD = [("params (M)", lambda r: r["params"] / 1e6 if r.get("params") else None, 2, True),
                ("size (MB)", lambda r: r["size_bytes"] / 1e6 if r.get("size_bytes") is not None else None, 1, True)]
_COMMON_TAIL = [("peak RSS (MB)", lambda r: _get(r, "memory", "peak_rss_mb"), 0, True)]
COLUMNS = {
    "causal-lm": _COMMON_HEAD + [
        ("perplexity", _perplexity, 3, True),
        ("top-1 agreement", lambda r: _get(r, "quality", "top1_agreement"), 4, False),
        ("KL", lambda r: _get(r, "quality", "kl"), 4, False),
        ("prefill ms", lambda r: _get(r, "latency", "prefill", "median_ms"), 1, True),
        ("decode tok/s", _decode_tok_s, 1, True),
        ("% of bandwidth bound", _bound_percent, 0, False),
    ] + _COMMON_TAIL,
    "sequence-classification": _COMMON_HEAD + [
        ("accuracy", _accuracy, 4, True),
        ("macro-F1", lambda r: _get(r, "quality", "macro_f1"), 4, True),
        ("label agreement", lambda r: _get(r, "quality", "label_agreement"), 4, False),
        ("batch-1 ms", _batch1_ms, 2, True),
        ("items/s", lambda r: _get(r, "latency", "throughput_items_per_s"), 1, True),
    ] + _COMMON_TAIL,
    "feature-extraction": _COMMON_HEAD + [
        ("cosine", _cosine, 4, False),
        ("NN agreement", lambda r: _get(r, "quality", "nn_agreement"), 4, False),
        ("batch-1 ms", _batch1_ms, 2, True),
        ("items/s", lambda r: _get(r, "latency", "throughput_items_per_s"), 1, True),
    ] + _COMMON_TAIL,
}


def _extra(r, name: str, metric: str):
    return _get(r, "quality", "extra_data", name, metric)


def _extra_names(records: list[dict]) -> list[str]:
    """The extra corpora (`benchmark.extra_data`) some record was scored on, in order of appearance."""
    return list(dict.fromkeys(n for r in records for n in (_get(r, "quality", "extra_data") or {})))


def _columns(task: str, records: list[dict]) -> list[tuple]:
    """COLUMNS[task], plus a perplexity column per extra corpus after "perplexity" and, where computed, a
    top-1 agreement column per extra corpus after "KL"."""
    cols = list(COLUMNS[task])
    names = _extra_names(records)
    if not names:
        return cols
    ppl = [(f"perplexity ({n})", lambda r, n=n: _extra(r, n, "perplexity"), 3, True) for n in names]
    agree = [(f"top-1 agreement ({n})", lambda r, n=n: _extra(r, n, "top1_agreement"), 4, False) for n in names
             if any(_extra(r, n, "top1_agreement") is not None for r in records)]
    heads = [c[0] for c in cols]
    at = heads.index("KL") + 1
    cols[at:at] = agree
    at = heads.index("perplexity") + 1
    cols[at:at] = ppl
    return cols


def _measured(records):
    return [r for r in records if "skipped" not in r and "error" not in r]


def _baseline_for(record: dict, records: list[dict]) -> dict | None:
    """The baseline's record on the same backend (else on any backend) for ratios."""
    bases = [r for r in _measured(records) if r.get("is_baseline") and r["task"] == record["task"]]
    same = [r for r in bases if r["backend"] == record["backend"]]
    return (same or bases or [None])[0]


def _safe(getter, r):
    try:
        return getter(r)
    except (KeyError, TypeError, ZeroDivisionError):
        return None


def _results_table(task: str, records: list[dict]) -> tuple[list[str], list[list[str]]]:
    cols = _columns(task, records)
    head = ["checkpoint", "backend"] + [c[0] for c in cols]
    rows = []
    for r in records:
        base = _baseline_for(r, records)
        cells = [r["label"], r["backend"]]
        for _, getter, digits, ratio in cols:
            v = _safe(getter, r)
            b = _safe(getter, base) if (ratio and base is not None) else None
            cells.append(_cell(v, b, digits))
        rows.append(cells)
    return head, rows


# The headline of each task against one reference row: (quality name, getter), (speed name, getter, higher is
# faster). Deployment targets are stated this way ("ORT int8 vs the fp32 model on torch"), across backends.
HEADLINE = {
    "causal-lm": (("perplexity", _perplexity), ("decode speed", _decode_tok_s, True)),
    "sequence-classification": (("accuracy", _accuracy), ("batch-1 speed", _batch1_ms, False)),
    "feature-extraction": (("cosine", _cosine), ("batch-1 speed", _batch1_ms, False)),
}


def _against_reference(task: str, records: list[dict]) -> tuple[dict, list[str], list[list[str]]] | None:
    """Every row against the baseline on the first backend measured (e.g. fp32 on torch-cpu), when a run
    spans several backends; None otherwise."""
    if len({r["backend"] for r in records}) < 2:
        return None
    ref = next((r for r in records if r.get("is_baseline")), None)
    if ref is None:
        return None
    (qname, quality), (sname, speed, higher) = HEADLINE[task]
    extras = [(f"perplexity ({n})", lambda r, n=n: _extra(r, n, "perplexity")) for n in _extra_names(records)]
    head = ["checkpoint", "backend", "size: times smaller", f"{qname}: ratio"] + \
        [f"{name}: ratio" for name, _ in extras] + [f"{sname}: times faster"]
    rows = []
    for r in records:
        if r is ref:
            continue
        size = _ratio(_safe(lambda x: x["size_bytes"], ref), _safe(lambda x: x["size_bytes"], r))
        q = [_ratio(_safe(get, r), _safe(get, ref), digits=3) for _, get in [(qname, quality)] + extras]
        fast = _ratio(_safe(speed, r), _safe(speed, ref)) if higher else _ratio(_safe(speed, ref), _safe(speed, r))
        rows.append([r["label"], r["backend"], size, *q, fast])
    return ref, head, rows


def _ratio(a, b, digits: int = 2) -> str:
    return "-" if a is None or not b else f"{a / b:.{digits}f}x"


def _spread(lat: dict | None) -> str:
    if not lat:
        return "-"
    return f"{lat['median_ms']:.2f} (p90 {lat['p90_ms']:.2f}, min {lat['min_ms']:.2f}, max {lat['max_ms']:.2f})"


def _timing_table(records: list[dict]) -> tuple[list[str], list[list[str]]]:
    head = ["checkpoint", "backend", "threads", "loadavg before", "loadavg after", "timing 1 (ms)",
            "timing 2 (ms)", "max/min"]
    rows = []
    for r in records:
        lat = r.get("latency") or {}
        first, second = (lat.get("prefill"), lat.get("decode")) if r["task"] == "causal-lm" else \
            (lat.get("batch1"), lat.get("throughput"))
        ratios = [t["max_ms"] / t["min_ms"] for t in (first, second) if t and t.get("min_ms")]
        load = lambda k: " ".join(f"{x:.2f}" for x in r.get(k) or []) or "-"  # noqa: E731
        rows.append([r["label"], r["backend"], str(r.get("threads")), load("loadavg_before"), load("loadavg_after"),
                     _spread(first), _spread(second), f"{max(ratios):.2f}" if ratios else "-"])
    return head, rows


def _settings_lines(records: list[dict]) -> list[str]:
    seen, out = set(), []
    for r in records:
        s = r.get("settings") or {}
        text = json.dumps(s, sort_keys=True)
        if text in seen:
            continue
        seen.add(text)
        d, lat = s.get("data") or {}, s.get("latency")
        caps = ", ".join(f"{k} {d[k]}" for k in ("max_tokens", "max_examples", "max_length") if d.get(k) and
                         (k != "max_length" or r["task"] != "causal-lm"))
        line = f"{r['task']}: eval data `{d.get('source')}` split `{d.get('split')}` ({caps}); threads {s.get('threads')}"
        if r["task"] == "causal-lm":
            line += (f"; perplexity window {s.get('window')} stride {s.get('stride')}; KL over the source's top "
                     f"{s.get('kl_top_k')} tokens + rest")
            for name, e in (s.get("extra_data") or {}).items():
                line += (f"; corpus {name}: `{e.get('source')}` split `{e.get('split')}` (max_tokens "
                         f"{e.get('max_tokens')}), window = stride = {e.get('seq_len')}")
            if s.get("generations"):
                line += f"; generations: greedy, batch 1, {s['generations']['new_tokens']} new tokens at most"
        if lat:
            work = (f"batch {lat['batch']}, prompt {lat['prompt_tokens']} tokens, {lat['new_tokens']} new tokens"
                    if r["task"] == "causal-lm" else
                    f"{lat['seq_tokens']} tokens, batch 1 and batch {lat['throughput_batch']}")
            line += f"; latency: {work}; {lat['warmup']} warm-up + {lat['repeats']} timed runs"
            if lat.get("rounds", 1) > 1:
                line += (f" in each of {lat['rounds']} rounds (fresh processes, the rows taking turns; "
                         "medians over all runs)")
        out.append(line)
    return out


def _generation_blocks(records: list[dict]) -> list[tuple]:
    """Per prompt: the prompt, then the baseline's continuation, then each checkpoint's (pipeline order);
    the backends of one checkpoint that continue identically share one entry."""
    rows = [r for r in records if r.get("generations")]
    if not rows:
        return []
    labels = list(dict.fromkeys([r["label"] for r in rows if r.get("is_baseline")] + [r["label"] for r in rows]))
    prompts = list(dict.fromkeys(g["prompt"] for r in rows for g in r["generations"]))
    blocks: list[tuple] = [("h2", "Generations"),
                           ("p", "Greedy continuations of fixed prompts (batch 1, with the KV cache, each backend's "
                                 "own decode loop), up to EOS or the token limit; the baseline first.")]
    for i, prompt in enumerate(prompts, 1):
        blocks += [("h3", f"Prompt {i}"), ("pre", prompt)]
        for label in labels:
            same = [r for r in rows if r["label"] == label]
            who = f"`{label}`" + (" (baseline)" if any(r.get("is_baseline") for r in same) else "")
            by_text: dict[tuple, list[str]] = {}  # (text, tokens, end) -> backends
            for r in same:
                for g in r["generations"]:
                    if g["prompt"] == prompt:
                        end = "EOS" if g.get("stopped_at_eos") else "the token limit"
                        by_text.setdefault((g["text"], len(g["ids"]), end), []).append(r["backend"])
            for (text, n, end), backends in by_text.items():
                blocks.append(("p", f"{who} on {', '.join(backends)}: {n} tokens, to {end}"))
                blocks.append(("pre", text or "(nothing: EOS came first)"))
    return blocks


_PLOT_COSTS = ("latency", "size")


def _plot_name(task: str, cost: str) -> str:
    return f"{task}-quality-vs-{cost}.png"


def _error_summary(error: str) -> str:
    """The first line of an error, and its last when it has more (a crashed worker's: "... exited with code 1:"
    then its stderr, whose last line says why); results.json keeps the whole text."""
    lines = [line.strip() for line in error.splitlines() if line.strip()] or [""]
    return lines[0] + (f" ... {lines[-1]}" if len(lines) > 1 else "")


def build_blocks(records: list[dict], title: str, command: str | None, out_dir: Path) -> list[tuple]:
    """The report as blocks: ("h1"|"h2"|"h3"|"p"|"li"|"pre", text), ("table", head, rows), ("img", file, alt)."""
    blocks: list[tuple] = [("h1", title)]
    if command:
        blocks.append(("p", f"Made by: `{command}`"))
    blocks.append(("p", "Each row is one checkpoint on one backend, in pipeline order. A figure in brackets is its "
                        "ratio to the baseline on the same backend. Latency figures are medians."))
    tasks = list(dict.fromkeys(r["task"] for r in records))
    for task in tasks:
        rs = [r for r in _measured(records) if r["task"] == task]
        if not rs:
            continue
        blocks.append(("h2", f"Results: {task}"))
        blocks.append(("table", *_results_table(task, rs)))
        borrowed = {r["backend"]: base["backend"] for r in rs
                    if (base := _baseline_for(r, rs)) is not None and base["backend"] != r["backend"]}
        for backend, base_backend in borrowed.items():  # the intro line says "on the same backend"
            blocks.append(("p", f"No baseline row on {backend}: the ratios in brackets of its rows are to the "
                                f"baseline on {base_backend}."))
        against = _against_reference(task, rs)
        if against is not None:
            ref, head, rows = against
            blocks.append(("p", f"Against the baseline `{ref['label']}` on {ref['backend']}, across backends "
                                "(what a deployment gains over the model it replaces):"))
            blocks.append(("table", head, rows))
        for cost in _PLOT_COSTS:
            name = _plot_name(task, cost)
            if scatter(rs, task, cost, out_dir / name) is not None:
                blocks.append(("img", name, f"{QUALITY_AXIS[task][1]} against {cost}; the dashed line joins the "
                                            "Pareto front"))
    blocks += _generation_blocks(_measured(records))
    others = [r for r in records if "skipped" in r or "error" in r or r.get("latency_error")
              or r.get("generations_error")]
    if others:
        blocks.append(("h2", "Not measured"))
        for r in others:
            why = r.get("skipped") or ("error: " + _error_summary(str(r["error"])) if "error" in r else
                                       "latency: " + str(r.get("latency_error")) if r.get("latency_error") else
                                       "generations: " + str(r.get("generations_error")))
            blocks.append(("li", f"{r['label']} on {r['backend']}: {why}"))
    noted = [(r, note) for r in _measured(records) for note in r.get("notes") or []]
    if noted:  # what a row's figures lack (teacher-agreement, a timing round)
        blocks.append(("h2", "Notes"))
        blocks += [("li", f"{r['label']} on {r['backend']}: {note}") for r, note in noted]
    measured = _measured(records)
    if measured:
        blocks.append(("h2", "Measurement conditions"))
        blocks.append(("p", "Timing 1 is prefill (decoders) or batch-1 latency (encoders); timing 2 is the decode "
                            "loop or the throughput batch. max/min shows how noisy the machine was."))
        blocks.append(("table", *_timing_table(measured)))
        for line in _settings_lines(measured):
            blocks.append(("li", line))
        m = measured[0].get("machine") or {}
        versions = ", ".join(f"{k} {v}" for k, v in (m.get("versions") or {}).items())
        blocks.append(("li", f"machine: {m.get('cpu')} ({', '.join(m.get('cpu_flags') or []) or 'no flags read'}), "
                             f"{m.get('usable_cores')} usable cores of {m.get('cores')}, {m.get('memory_gb')} GB, "
                             f"GPU: {', '.join(m.get('gpus') or []) or 'none'}; memory bandwidth "
                             f"{m.get('memory_bandwidth_gb_s', 'not measured')} GB/s (copy benchmark: the decode "
                             "bound is this over the weight bytes read per token; a copy reads and writes, a "
                             "decode mostly reads, so a fast decode can pass 100% of this bound)"))
        blocks.append(("li", f"suite commit: {m.get('git_commit')}; {versions}"))
        times = sorted(r["measured_at"] for r in measured if r.get("measured_at"))
        if times:
            blocks.append(("li", f"measured {times[0]} to {times[-1]}"))
    return blocks


def _md(blocks) -> str:
    out = []
    for b in blocks:
        if b[0] == "h1":
            out.append(f"# {b[1]}\n")
        elif b[0] == "h2":
            out.append(f"\n## {b[1]}\n")
        elif b[0] == "h3":
            out.append(f"\n### {b[1]}\n")
        elif b[0] == "pre":
            fence = "`" * max(3, _longest_backtick_run(b[1]) + 1)
            out.append(f"{fence}text\n{b[1]}\n{fence}\n")
        elif b[0] == "p":
            out.append(f"{b[1]}\n")
        elif b[0] == "li":
            out.append(f"- {b[1]}")
        elif b[0] == "table":
            head, rows = b[1], b[2]
            out.append("| " + " | ".join(head) + " |")
            out.append("|" + "|".join(["---"] * len(head)) + "|")
            out += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
            out.append("")
        elif b[0] == "img":
            out.append(f"\n![{b[2]}]({b[1]})\n")
    return "\n".join(out).rstrip() + "\n"


def _longest_backtick_run(text: str) -> int:
    longest, run = 0, 0
    for ch in text:
        run = run + 1 if ch == "`" else 0
        longest = max(longest, run)
    return longest


def _inline(text: str) -> str:
    parts = html.escape(text).split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))


def _html(blocks, title: str, out_dir: Path) -> str:
    body, in_list = [], False
    for b in blocks:
        if b[0] != "li" and in_list:
            body.append("</ul>")
            in_list = False
        if b[0] in ("h1", "h2", "h3", "p"):
            body.append(f"<{b[0]}>{_inline(b[1])}</{b[0]}>")
        elif b[0] == "pre":
            body.append(f"<pre>{html.escape(b[1])}</pre>")
        elif b[0] == "li":
            if not in_list:
                body.append("<ul>")
                in_list = True
            body.append(f"<li>{_inline(b[1])}</li>")
        elif b[0] == "table":
            body.append("<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in b[1]) + "</tr>")
            body += ["<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in b[2]]
            body.append("</table>")
        elif b[0] == "img":
            data = base64.b64encode((out_dir / b[1]).read_bytes()).decode()
            body.append(f'<p><img alt="{html.escape(b[2])}" src="data:image/png;base64,{data}"></p>')
    if in_list:
        body.append("</ul>")
    style = ("body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px 6px;"
             "text-align:right}td:first-child,th:first-child{text-align:left}code{background:#f4f4f4}"
             "pre{background:#f4f4f4;padding:4px 8px;white-space:pre-wrap}")
    return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def write_report(records: list[dict], out_dir, title: str, *, command: str | None = None) -> Path:
    """Write results.json, report.md, report.html (plots embedded) and the PNG plots; return report.md."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = {"title": title, "command": command, "records": records}
    # an earlier report's plots in this folder would show rows this report does not have
    for name in (_plot_name(task, cost) for task in QUALITY_AXIS for cost in _PLOT_COSTS):
        (out_dir / name).unlink(missing_ok=True)
    (out_dir / RESULTS).write_text(json.dumps(results, indent=1, default=str) + "\n")
    blocks = build_blocks(records, title, command, out_dir)
    (out_dir / "report.md").write_text(_md(blocks))
    (out_dir / "report.html").write_text(_html(blocks, title, out_dir))
    return out_dir / "report.md"


def rebuild(run_dir) -> Path:
    """Rebuild every report file of `run_dir` from its results.json."""
    from compress.errors import CompressInputError

    run_dir = Path(run_dir)
    if run_dir.name == RESULTS and run_dir.is_file():  # the file itself named: its folder is meant
        run_dir = run_dir.parent
    path = run_dir / RESULTS
    if not path.exists() and (run_dir / "run.json").is_file():
        raise CompressInputError(f"{run_dir} has no {RESULTS}: this run's config has no benchmark section, so "
                                 "nothing was measured; add one and run it again (finished steps are reused), or "
                                 "measure its checkpoints with `compress bench`")
    if not path.exists():
        raise CompressInputError(f"{run_dir} has no {RESULTS}: give a run directory written by `compress run` "
                                 "or `compress bench`")
    try:
        results = json.loads(path.read_bytes().decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # not JSON, not UTF-8, or nested too deeply to parse
        raise CompressInputError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(results, dict) or not isinstance(results.get("records"), list):
        raise CompressInputError(f"{path} is not a results file of `compress run` or `compress bench` (expected "
                                 "an object with a list of records)")
    for i, r in enumerate(results["records"]):  # each row needs these to be placed in a table
        missing = [k for k in ("label", "backend", "task") if not isinstance(r, dict) or not isinstance(r.get(k), str)]
        if missing or r["task"] not in COLUMNS:
            what = f"has no {', '.join(missing)}" if missing else f"has an unknown task {r['task']!r}"
            raise CompressInputError(f"{path}: record {i} {what} (every record names its label, backend and one "
                                     f"of the tasks {', '.join(COLUMNS)}); restore the file or measure again")
    return write_report(results["records"], run_dir, results.get("title") or run_dir.name,
                        command=results.get("command"))
