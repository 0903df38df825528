"""What a search leaves in runs/<name>/search/: trials.json (every trial), report.md / report.html with the
Pareto front plotted and tabled, and best.yaml, the chosen recipe as a plain pipeline config that
`compress run` reproduces.

The chosen member is the best feasible trial by the first objective (ties by the next), or the trial picked
with `--pick N`. When no trial meets the constraints nothing is chosen, and the summary lists the closest."""
from __future__ import annotations

import base64
import html
import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from compress.errors import ConfigError

from ..runner import write_atomic  # a full disk or a kill mid-write leaves the old file
from .config import SearchSetup
from .figures import METRICS, pareto
from .study import given_back

STATES = {"COMPLETE": "complete", "PRUNED": "pruned", "FAIL": "failed", "RUNNING": "running", "WAITING": "waiting"}


@dataclass
class Outcome:
    rows: list[dict]
    front: list[int]
    chosen: int | None
    picked: bool
    closest: list[int] = field(default_factory=list)
    files: dict[str, Path] = field(default_factory=dict)


def trial_rows(study) -> list[dict]:
    rows, refused = [], set()
    for t in study.get_trials(deepcopy=False):
        a = t.user_attrs
        if given_back(t):  # no recipe was tried
            continue
        if a.get("refused") or a.get("same_as") in refused:  # a copy is what its original was
            refused.add(t.number)
        state = "refused" if t.number in refused else STATES.get(t.state.name, t.state.name.lower())
        rows.append({"number": t.number, "state": state,
                     "options": a.get("options", {}), "values": a.get("values", {}), "figures": a.get("figures", {}),
                     "screen": a.get("screen", {}), "feasible": a.get("feasible"), "reason": a.get("reason"),
                     "violations": _violations(t), "backend": a.get("backend"), "same_as": a.get("same_as"),
                     "seconds": a.get("seconds")})
    return rows


def _violations(trial) -> list[float] | None:
    """By how much the trial breaks each constraint (0: kept), in the constraints' order, from Optuna's
    per-trial constraints (keys c0, c1, ...; "0", "1", ... in studies stored before); None when not judged."""
    c = trial.constraints
    return [c[k] for k in sorted(c, key=lambda k: int(k.lstrip("c")))] or None


def _key(row: dict, objectives) -> tuple:
    return tuple(row["figures"][n] * (-1 if d == "maximize" else 1) for n, d in objectives)


def choose(setup: SearchSetup, rows: list[dict], pick: int | None) -> Outcome:
    """The front (feasible complete trials no other beats), the chosen member, the closest when none is."""
    objectives = setup.objectives
    complete = [r for r in rows if r["state"] == "complete" and r["same_as"] is None]
    feasible = [r for r in complete if r["feasible"] is not False]
    front = sorted(pareto([(r["number"], r["figures"]) for r in feasible], objectives))
    if pick is not None:
        row = next((r for r in rows if r["number"] == pick), None)
        if row is None:
            raise ConfigError(f"--pick {pick}: the study has no trial {pick} " + (
                f"(trials 0 to {len(rows) - 1})" if rows else "(it has no trials yet: run the search first)"))
        if row["state"] in ("failed", "refused", "running", "waiting"):
            raise ConfigError(f"--pick {pick}: trial {pick} {row['state']}"
                              + (f" ({row['reason']})" if row.get("reason") else "") + "; pick another trial")
        return Outcome(rows, front, pick, True)
    if feasible:
        best = min((r for r in feasible if r["number"] in front), key=lambda r: _key(r, objectives))
        return Outcome(rows, front, best["number"], False)
    judged = [r for r in rows if r.get("violations") and r["same_as"] is None]
    closest = sorted(judged, key=lambda r: (sum(r["violations"]), r["number"]))[:3]
    return Outcome(rows, front, None, False, closest=[r["number"] for r in closest])


def best_yaml(setup: SearchSetup, row: dict) -> str:
    """The trial's recipe as a plain pipeline config (the search's name, model, data, benchmark)."""
    raw = setup.pipeline_raw(row["values"])
    return (f"# compress search {setup.path or setup.name}: trial {row['number']} "
            f"({', '.join(f'{k}={v}' for k, v in row['options'].items())})\n"
            + yaml.safe_dump(raw, sort_keys=False))


# ---------------------------------------------------------------------------------------------- text
def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return json.dumps(v) if not isinstance(v, str) else v


def _columns(setup: SearchSetup) -> list[str]:
    names = [n for n, _ in setup.objectives] + [c.name for c in setup.constraints]
    return list(dict.fromkeys(names))


def _table(setup: SearchSetup, rows: list[dict], chosen: int | None, repeats: dict[int, int]) -> list[str]:
    labels = list(dict.fromkeys(k for r in rows for k in r["options"]))
    cols = _columns(setup)
    head = ["trial", *labels, *cols, "state"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        mark = " (chosen)" if r["number"] == chosen else ""
        again = f" (proposed {repeats[r['number']]} more times)" if repeats.get(r["number"]) else ""
        cells = [f"{r['number']}{mark}", *(_fmt(r["options"].get(k)) for k in labels),
                 *(_fmt(r["figures"].get(c)) for c in cols),
                 r["state"] + again + (f": {r['reason']}" if r["reason"] else "")]
        out.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return out


def _repeats(rows: list[dict]) -> dict[int, int]:
    """How many later proposals repeated each trial (copies: nothing ran for them)."""
    counts: dict[int, int] = {}
    for r in rows:
        if r["same_as"] is not None:
            counts[r["same_as"]] = counts.get(r["same_as"], 0) + 1
    return counts


def summary(setup: SearchSetup, outcome: Outcome) -> list[str]:
    """The lines the CLI prints at the end: the front, the chosen member (or the closest trials)."""
    counts: dict[str, int] = {}
    distinct = [r for r in outcome.rows if r["same_as"] is None]
    for r in distinct:
        counts[r["state"]] = counts.get(r["state"], 0) + 1
    copies = len(outcome.rows) - len(distinct)
    lines = [f"{len(distinct)} trial{'s' * (len(distinct) != 1)}"
             + (" (" + ", ".join(f"{n} {s}" for s, n in counts.items()) + ")" if counts else "")
             + (f" and {copies} proposal{'s' * (copies != 1)} that repeated one (not run)" if copies else "") + "; "
             f"Pareto front: {', '.join(map(str, outcome.front)) or 'empty'}"]
    by_number = {r["number"]: r for r in outcome.rows}
    cols = _columns(setup)
    if outcome.chosen is not None:
        r = by_number[outcome.chosen]
        figs = ", ".join(f"{c} {_fmt(r['figures'].get(c))}" for c in cols)
        how = "picked" if outcome.picked else "chosen (best feasible by " + setup.objectives[0][0] + ")"
        lines.append(f"{how}: trial {r['number']}: {', '.join(f'{k}={_fmt(v)}' for k, v in r['options'].items())}"
                     f" -> {figs}")
        if outcome.picked and r["feasible"] is False:
            lines.append(f"note: trial {r['number']} breaks a constraint ({r['reason']})")
    elif not outcome.closest:  # no trial got figures: there is nothing to be close, and no constraint to blame
        lines.append("no trial was measured" + (" (each failed or was refused: see the reasons in the report's "
                                                "table and the log)" if distinct else "") + "; nothing chosen")
    else:
        constraints = "; ".join(c.text for c in setup.constraints) or "(none)"
        lines.append(f"no trial meets the constraints ({constraints}); nothing chosen. Closest:")
        for n in outcome.closest:
            r = by_number[n]
            figs = ", ".join(f"{c.name} {_fmt(r['figures'].get(c.name))}" for c in setup.constraints)
            lines.append(f"  trial {n}: {', '.join(f'{k}={_fmt(v)}' for k, v in r['options'].items())} -> {figs}")
        lines.append("loosen a constraint or widen the search space (a new search: give it another name), or write "
                     "one of these with --pick N")
    return lines


# ---------------------------------------------------------------------------------------------- plots
def _plot(setup: SearchSetup, outcome: Outcome, quality: str, cost: str, path: Path) -> Path | None:
    """Quality against one cost for every complete trial, the front joined, the chosen one starred."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [(r["number"], r["figures"].get(cost), r["figures"].get(quality)) for r in outcome.rows
           if r["state"] == "complete" and r["same_as"] is None]
    pts = [p for p in pts if p[1] is not None and p[2] is not None]
    if not pts:
        return None
    fig, ax = plt.subplots(figsize=(7.2, 4.4), dpi=100)
    ax.scatter([p[1] for p in pts], [p[2] for p in pts], color="tab:gray", s=28, label="trials", zorder=2)
    front = sorted((p for p in pts if p[0] in outcome.front), key=lambda p: p[1])
    if front:
        ax.plot([p[1] for p in front], [p[2] for p in front], color="tab:red", marker="o", linestyle="--",
                fillstyle="none", markersize=11, label="Pareto front (all objectives)", zorder=1)
    for n, x, y in pts:
        if n == outcome.chosen:
            ax.scatter([x], [y], color="tab:green", marker="*", s=220, label=f"chosen: trial {n}", zorder=3)
    ax.set_xlabel(f"{cost} ({METRICS[cost][0]})")
    ax.set_ylabel(f"{quality} ({METRICS[quality][0]})")
    ax.set_title(f"{setup.name}: {quality} vs {cost}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png", metadata={"Software": None})
    plt.close(fig)
    return path


def _plots(setup: SearchSetup, outcome: Outcome, out_dir: Path) -> list[Path]:
    task = setup.pipeline.config.task
    quality = {"causal-lm": "perplexity", "sequence-classification": "accuracy"}.get(task)
    if quality is None:
        return []
    out = []
    speed = next((c for c in ("decode_tok_s", "batch1_ms", "prefill_ms") if any(
        c in r["figures"] for r in outcome.rows)), None)
    for cost, name in ((speed, "front-speed.png"), ("size_mb", "front-size.png")):
        if cost is not None:
            p = _plot(setup, outcome, quality, cost, out_dir / name)
            out += [p] if p else []
    return out


# ---------------------------------------------------------------------------------------------- files
def _conditions_line(c: dict) -> str:
    load = c.get("load_1min")
    when = c.get("measured")
    return (f"Measured on {c['machine']}, {'/'.join(map(str, c['threads']))} threads, "
            f"memory bandwidth {c.get('memory_bandwidth_gb_s')} GB/s: {c['measurements']} full measurements"
            + (f" from {when[0]} to {when[1]}" if when else "")
            + (f", 1-minute load average {load[0]:.2f} to {load[1]:.2f}" if load else "")
            + f"; suite commit {c.get('git_commit')}.")


def write(setup: SearchSetup, outcome: Outcome, out_dir: Path, source: dict, stopped_by: str = "",
          conditions: dict | None = None, screen_slice: str | None = None) -> dict:
    out_dir = Path(out_dir)
    by_number = {r["number"]: r for r in outcome.rows}
    trials_json = {"name": setup.name, "objectives": [list(o) for o in setup.objectives],
                   "constraints": [c.text for c in setup.constraints], "source": source, "conditions": conditions,
                   "front": outcome.front, "chosen": outcome.chosen, "picked": outcome.picked,
                   "closest": outcome.closest, "trials": outcome.rows}
    files = {"trials": out_dir / "trials.json"}
    write_atomic(files["trials"], json.dumps(trials_json, indent=2, default=str) + "\n")
    if outcome.chosen is not None:
        files["best"] = out_dir / "best.yaml"
        write_atomic(files["best"], best_yaml(setup, by_number[outcome.chosen]))
    plots = _plots(setup, outcome, out_dir)
    lines = [f"# {setup.name}: recipe search", "",
             f"Objectives: {', '.join(f'{n} ({d})' for n, d in setup.objectives)}. "
             f"Constraints: {'; '.join(c.text for c in setup.constraints) or 'none'}. "
             f"Sampler: {setup.settings.sampler}." + (f" Stopped by {stopped_by}." if stopped_by else ""), "",
             *summary(setup, outcome), ""]
    base = source.get("full") or source.get("screen") or {}
    lines += [f"Ratios are against {source.get('target')} ("
              + ", ".join(f"{k} {_fmt(v)}" for k, v in base.items()) + ").", ""]
    if conditions:
        lines += [_conditions_line(conditions), ""]
    if screen_slice and not setup.needs_full:  # every figure is the screen's, not what `compress run` measures
        lines += [f"Quality is scored on the screen's slice of the eval data ({screen_slice}); `compress run` of a "
                  "recipe scores all of it, so its figures differ a little.", ""]
    repeats = _repeats(outcome.rows)
    if outcome.front:
        lines += ["## Pareto front", "",
                  *_table(setup, [by_number[n] for n in outcome.front], outcome.chosen, repeats), ""]
    lines += [f"![{p.stem}]({p.name})" for p in plots] + [""] if plots else []
    lines += ["## Every trial", "", "Each recipe once; trials.json also lists the proposals that repeated one.", "",
              *_table(setup, [r for r in outcome.rows if r["same_as"] is None], outcome.chosen, repeats), ""]
    if "best" in files:
        lines += [f"`compress run {files['best']}` reproduces the chosen recipe.", ""]
    files["report"] = out_dir / "report.md"
    write_atomic(files["report"], "\n".join(lines))
    files["html"] = out_dir / "report.html"
    write_atomic(files["html"], _html(lines, plots, setup.name))
    return files


def _html(lines: list[str], plots: list[Path], title: str) -> str:
    """report.md's content as one self-contained page (tables as tables, plots inline)."""
    body, table = [], []

    def flush():
        if table:
            rows = [ln.strip("|").split(" | ") for ln in table if not ln.startswith("|---")]
            tags = ["th"] + ["td"] * (len(rows) - 1)  # the first row is the header
            cells = ["<tr>" + "".join(f"<{tag}>{html.escape(c.strip())}</{tag}>" for c in row) + "</tr>"
                     for tag, row in zip(tags, rows)]
            body.append("<table>" + "".join(cells) + "</table>")
            table.clear()

    images = {p.name: p for p in plots}
    for ln in lines:
        if ln.startswith("|"):
            table.append(ln)
            continue
        flush()
        if ln.startswith("# "):
            body.append(f"<h1>{html.escape(ln[2:])}</h1>")
        elif ln.startswith("## "):
            body.append(f"<h2>{html.escape(ln[3:])}</h2>")
        elif ln.startswith("![") and ln[ln.index("(") + 1:-1] in images:
            data = base64.b64encode(images[ln[ln.index("(") + 1:-1]].read_bytes()).decode()
            body.append(f'<img alt="front" src="data:image/png;base64,{data}">')
        elif ln:
            body.append(f"<p>{html.escape(ln)}</p>")
    flush()
    style = "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}td,th{border:1px solid #ccc;" \
            "padding:3px 6px;font-size:13px}"
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>{''.join(body)}</body></html>\n")
