"""What a search measures and judges: metric names, their direction, whether screening gives them, the
ratios to the source model that constraints use, and Pareto dominance.

A trial's figures are one flat dict: `perplexity`, `size_mb`, `decode_tok_s`, ... and, for each, the ratio
to the source model measured the same way (`perplexity_ratio`, `size_ratio`), plus the speed-ups people
state constraints in (`decode_speedup` = tok/s over the source's, `latency_speedup` = the source's batch-1
latency over this one's)."""
from __future__ import annotations

import difflib
import operator
import re
from dataclasses import dataclass

# name -> (direction, cheap: known after screening (quality on a slice, size from the files), description)
METRICS = {
    "perplexity": ("minimize", True, "perplexity on the eval data (causal-lm)"),
    "accuracy": ("maximize", True, "accuracy on the eval data (sequence-classification)"),
    "size_mb": ("minimize", True, "weights on disk, MB"),
    "decode_tok_s": ("maximize", False, "greedy decode tokens/s with the KV cache (causal-lm)"),
    "prefill_ms": ("minimize", False, "prompt processing, median ms (causal-lm)"),
    "batch1_ms": ("minimize", False, "batch-1 latency, median ms (encoders, classifiers)"),
    "peak_memory_mb": ("minimize", False, "peak resident memory of the measuring process, MB"),
}
# derived figures constraints may name: name -> (metric, how it is computed from trial t and source s)
DERIVED = {
    "decode_speedup": ("decode_tok_s", lambda t, s: t / s),
    "latency_speedup": ("batch1_ms", lambda t, s: s / t),
    "size_reduction": ("size_mb", lambda t, s: s / t),
}
QUALITY = {"causal-lm": "perplexity", "sequence-classification": "accuracy"}
# the speed figures the harness times for each task (decoders decode, encoders run batch 1)
SPEED = {"causal-lm": ("decode_tok_s", "prefill_ms"), "sequence-classification": ("batch1_ms",),
         "feature-extraction": ("batch1_ms",)}
_OPS = {"<=": operator.le, ">=": operator.ge, "<": operator.lt, ">": operator.gt}


def known_names() -> list[str]:
    return [*METRICS, *(f"{m}_ratio" for m in METRICS), *DERIVED]


def base_metric(name: str) -> str:
    """The measured metric a figure comes from (`perplexity_ratio` -> perplexity)."""
    if name in DERIVED:
        return DERIVED[name][0]
    return name[: -len("_ratio")] if name.endswith("_ratio") else name


def is_cheap(name: str) -> bool:
    return METRICS[base_metric(name)][1]


def measured_for(task: str) -> set[str]:
    """The metrics a trial of `task` gets (a figure of any other is never known, so never judged)."""
    return {"size_mb", "peak_memory_mb", *SPEED.get(task, ()), *([QUALITY[task]] if task in QUALITY else [])}


def unknown_name(name: str, where: str) -> str | None:
    """An error naming the closest known figure, or None when `name` is one."""
    if name in known_names():
        return None
    close = difflib.get_close_matches(name, known_names(), n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return f"{where}: unknown figure {name!r}; {hint}known: {', '.join(known_names())}"


@dataclass(frozen=True)
class Constraint:
    name: str
    op: str
    bound: float

    @property
    def text(self) -> str:
        return f"{self.name} {self.op} {self.bound:g}"

    def violation(self, figures: dict) -> float | None:
        """0 when met, else how far off (relative to the bound); None when the figure is not known yet."""
        value = figures.get(self.name)
        if value is None:
            return None
        if _OPS[self.op](value, self.bound):
            return 0.0
        # never 0 when broken: a strict bound missed by nothing (`size_mb_ratio < 1` at exactly 1) is broken too
        return max(abs(value - self.bound) / max(abs(self.bound), 1e-12), 1e-12)


def parse_constraint(text: str, where: str) -> tuple[Constraint | None, str | None]:
    m = re.fullmatch(r"\s*([A-Za-z0-9_]+)\s*(<=|>=|<|>)\s*([-+0-9.eE]+)\s*", str(text))
    if m is None:
        return None, (f"{where}: {text!r} is not a constraint; write `figure <= number` or `figure >= number`, "
                      "e.g. perplexity_ratio <= 1.03")
    problem = unknown_name(m.group(1), where)
    if problem:
        return None, problem
    try:
        bound = float(m.group(3))
    except ValueError:
        return None, f"{where}: {m.group(3)!r} is not a number"
    name, op = m.group(1), m.group(2)
    # a bound no figure can meet would only be found out after the whole budget is spent
    if op in ("<=", "<") and bound <= 0:
        return None, f"{where}: {text!r} can never hold: {name} is always above 0"
    if name == "accuracy" and op in (">=", ">") and (bound > 1 or (op == ">" and bound == 1)):
        return None, (f"{where}: {text!r} can never hold: accuracy is a fraction from 0 to 1 (0.9 is 90%); "
                      "or bound accuracy_ratio, e.g. accuracy_ratio >= 0.99")
    return Constraint(name, op, bound), None


def figures_from(quality: dict | None, size_bytes: int | None, record: dict | None = None) -> dict:
    """The flat figures of one measurement: quality from a harness record's `quality`, size from the files,
    speed and memory from a full harness record."""
    out: dict = {}
    for key in ("perplexity", "accuracy"):
        if quality and isinstance(quality.get(key), (int, float)):
            out[key] = float(quality[key])
    if size_bytes is not None:
        out["size_mb"] = size_bytes / 1e6
    if record:
        lat, mem = record.get("latency") or {}, record.get("memory") or {}
        speed = {"decode_tok_s": lat.get("decode_tokens_per_s"),
                 "prefill_ms": (lat.get("prefill") or {}).get("median_ms"),
                 "batch1_ms": (lat.get("batch1") or {}).get("median_ms"),
                 "peak_memory_mb": mem.get("peak_rss_mb")}
        out.update({k: float(v) for k, v in speed.items() if isinstance(v, (int, float))})
    return out


def with_ratios(figures: dict, source: dict) -> dict:
    """`figures` plus the ratio of each to the source's, and the derived speed-ups."""
    out = dict(figures)
    for k, v in figures.items():
        if k in METRICS and source.get(k):
            out[f"{k}_ratio"] = v / source[k]
    for name, (metric, fn) in DERIVED.items():
        if figures.get(metric) and source.get(metric):
            out[name] = fn(figures[metric], source[metric])
    return out


def dominates(a: dict, b: dict, objectives: list[tuple[str, str]]) -> bool:
    """Whether figures `a` are at least as good as `b` on every objective and better on one."""
    better = False
    for name, direction in objectives:
        x, y = a.get(name), b.get(name)
        if x is None or y is None:
            return False
        if direction == "maximize":
            x, y = -x, -y
        if x > y:
            return False
        better = better or x < y
    return better


def pareto(items: list[tuple[int, dict]], objectives: list[tuple[str, str]]) -> list[int]:
    """The ids of the items no other item dominates."""
    return [i for i, f in items if not any(dominates(g, f, objectives) for j, g in items if j != i)]
