"""`compress bench` and `compress report` (added to the `compress` command by pipelines/cli.py)."""
from __future__ import annotations

import shlex
import sys
from pathlib import Path

from compress.errors import ConfigError

from .worker_spec import BACKENDS


def _csv(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def settings_from_args(args):
    from pydantic import ValidationError

    from compress.errors import format_validation_error

    from .config import BenchmarkConfig

    raw: dict = {"backends": _csv(args.backends) if args.backends else None, "quality": _csv(args.quality),
                 "threads": args.threads, "window": args.window, "stride": args.stride, "eval_batch": args.eval_batch}
    if args.data:
        raw["data"] = {"source": args.data, **_data_caps(args)}
    lat = {"batch": args.batch, "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
           "seq_tokens": args.seq_tokens, "throughput_batch": args.throughput_batch, "warmup": args.warmup,
           "repeats": args.repeats, "rounds": args.rounds}
    lat = {k: v for k, v in lat.items() if v is not None}
    if args.no_latency and lat:  # else the timing options would be dropped without a word
        given = ", ".join("--" + k.replace("_", "-") for k in lat)
        raise ConfigError(f"{given}: timing options, and --no-latency turns timing off; drop one or the other")
    raw["latency"] = None if args.no_latency else lat
    try:
        return BenchmarkConfig(**{k: v for k, v in raw.items() if v is not None or k == "latency"})
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, BenchmarkConfig, prefix="bench.")) from None


def _data_caps(args) -> dict:
    """--split / --max-tokens / --max-examples / --max-length as data options (those given)."""
    caps = {"split": args.split, "max_tokens": args.max_tokens, "max_examples": args.max_examples,
            "max_length": args.max_length}
    return {k: v for k, v in caps.items() if v is not None}


def _default_data(args, target: str):
    """Without --data: the target's task's default eval data with the caps given (None when none is)."""
    from pydantic import ValidationError

    from compress.data import DataSpec
    from compress.errors import format_validation_error

    from .config import DEFAULT_EVAL
    from .harness import resolve_target

    caps = _data_caps(args)
    if args.data or not caps:
        return None
    try:
        return DataSpec(**{**DEFAULT_EVAL[resolve_target(target, args.task).task], **caps})
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, DataSpec, prefix="bench.data.")) from None


def _own_backend(target: str, task: str | None) -> str:
    """The runtime a target is made for (without --backends): ONNX Runtime for ONNX models, llama.cpp for GGUF
    files, torch for the rest."""
    from .harness import resolve_target

    return {"onnx": "ort-cpu", "gguf": "llamacpp-cpu"}.get(resolve_target(target, task).kind, "torch-cpu")


def _labels(targets: list[str]) -> list[str]:
    out = []
    for t in targets:
        name = t if t.startswith(("builtin:", "hf:")) else Path(t).name or t
        out.append(name if name not in out else f"{name}#{len(out) + 1}")
    return out


def print_table(records: list[dict]) -> None:
    from rich.console import Console
    from rich.markup import escape  # labels and reasons are text: "pip install -e '.[llama]'" lost "[llama]"
    from rich.table import Table

    from .report import _measured, _results_table

    console = Console() if sys.stdout.isatty() else Console(width=240)
    for task in dict.fromkeys(r["task"] for r in records):
        rs = [r for r in _measured(records) if r["task"] == task]
        if rs:
            head, rows = _results_table(task, rs)
            table = Table(title=task)
            for h in head:
                table.add_column(h, justify="left" if h in ("checkpoint", "backend") else "right")
            for row in rows:
                table.add_row(*map(escape, row))
            console.print(table)
    for r in records:
        if "skipped" in r or "error" in r:
            console.print(f"[yellow]{escape(r['label'])} on {r['backend']}: "
                          f"{escape(r.get('skipped') or 'error: ' + str(r.get('error')))}[/yellow]")


def _check_output_folder(folder: str, option: str) -> None:
    """ConfigError when `folder` is, or lies inside, a checkpoint: the files written there (report, plots,
    inputs) are not in its manifest, so the checkpoint would refuse to load afterwards. Also when it is the
    folder of a `compress run`, whose results.json and reports the bench's would replace."""
    from compress.checkpoint import enclosing_checkpoint

    if option == "--output" and (Path(folder).expanduser() / "run.json").is_file():
        raise ConfigError(f"{option} {folder}: is the folder of a `compress run` (run.json); the bench's "
                          "results.json and reports would replace the run's; give another folder, e.g. "
                          f"{Path(folder) / 'bench'}")
    parent = enclosing_checkpoint(folder)
    if parent is not None:
        raise ConfigError(f"{option} {folder}: is inside the checkpoint {parent}; the files written there "
                          "would not be in its manifest and it would refuse to load; give a folder outside "
                          "it, e.g. runs/bench")


def _keep_previous(out: Path) -> Path | None:
    """An earlier bench's results in `out` (results.json, reports, plots, log) moved to previous/<when it was
    written>/ so that this bench does not write over them; that folder, or None."""
    import time

    from .report import RESULTS

    old = out / RESULTS
    if not old.is_file():
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(old.stat().st_mtime))
    dest, n = out / "previous" / stamp, 1
    while dest.exists():
        dest, n = out / "previous" / f"{stamp}-{n}", n + 1
    dest.mkdir(parents=True)
    for f in [old, out / "report.md", out / "report.html", out / "bench.log", *out.glob("*.png")]:
        if f.is_file():
            f.replace(dest / f.name)
    return dest


def _same_target(a: str, b: str) -> bool:
    """Two spellings of one target: the same existing path (`runs/x/01-prune` and `runs/x/01-prune/`), or the
    same model source."""
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    return pa.resolve() == pb.resolve() if pa.exists() and pb.exists() else a == b


def cmd_bench(args) -> int:
    from compress.logs import capture
    from compress.runtime import output_folder

    from .harness import measure, resolve_baseline, resolve_target, timing_rounds
    from .report import write_report

    settings = settings_from_args(args)
    _check_output_folder(args.output, "--output")
    if args.work_dir:
        _check_output_folder(args.work_dir, "--work-dir")
    out = output_folder(args.output, "--output")
    work_dir = output_folder(args.work_dir, "--work-dir") if args.work_dir else out / ".bench"
    show = False if args.no_progress else None
    targets = list(args.targets)
    labels = _labels(targets)
    base_index = None
    if args.baseline:
        same = [i for i, t in enumerate(targets) if _same_target(t, args.baseline)]  # `X` and `X/` alike
        if same:
            base_index = same[0]
        else:
            targets.insert(0, args.baseline)
            labels.insert(0, "baseline")
            base_index = 0
    for target in targets:  # bad input (a target, a baseline of another task) fails before any row is measured
        resolved = resolve_target(target, args.task)
        task = resolved.task
        if resolved.kind == "gguf" and not args.baseline:
            raise ConfigError(f"{target}: a GGUF file is measured on the token ids of its baseline's tokenizer; "
                              "name the model it was converted from with --baseline, e.g. --baseline "
                              "builtin:smollm2-135m")
        if args.baseline:
            resolve_baseline(args.baseline, task)
    kept = _keep_previous(out)
    if kept:
        print(f"bench: the earlier results in {out} are kept in {kept}", file=sys.stderr)
    log_file = out / "bench.log"
    command = "compress bench " + " ".join(shlex.quote(a) for a in sys.argv[2:]) \
        if len(sys.argv) > 1 and sys.argv[1] == "bench" else args.command_text
    records, jobs = [], []
    try:
        with capture(log_file, verbose=args.verbose):  # other libraries' notices go to the log
            for i, (target, label) in enumerate(zip(targets, labels)):
                data = _default_data(args, target)
                for backend in settings.backends if args.backends else [_own_backend(target, args.task)]:
                    print(f"bench: {label} on {backend} ...", file=sys.stderr, flush=True)
                    job = dict(target=target, backend=backend, baseline=args.baseline, task=args.task, label=label,
                               data=data, work_dir=work_dir, show_progress=show)
                    r = measure(**job, settings=settings)
                    # Ratios are to the baseline, else to the first target.
                    r["is_baseline"] = i == (base_index if base_index is not None else 0)
                    records.append(r)
                    jobs.append(job)
            timing_rounds(records, jobs, settings, log=lambda msg: print(msg, file=sys.stderr, flush=True))
    except BaseException:  # Ctrl-C, SIGTERM, a failure: keep the rows measured so far
        if records:
            write_report(records, out, f"{args.title or 'compress bench'} (stopped after {len(records)} rows)",
                         command=command)
            print(f"bench: stopped; the {len(records)} rows measured so far are in {out / 'results.json'}",
                  file=sys.stderr)
        raise
    path = write_report(records, out, args.title or "compress bench", command=command)
    print_table(records)
    print(f"results: {out / 'results.json'}\nreport: {path} and {out / 'report.html'}\n"
          f"log: {log_file} (other libraries' warnings; --verbose shows them here)")
    if any("error" in r for r in records):
        return 1
    if all("skipped" in r for r in records):
        print("error: nothing was measured (every row was skipped, for the reasons above); pick backends that "
              "run these targets with --backends (ONNX folders: ort-cpu)", file=sys.stderr)
        return 1
    return 0


def cmd_report(args) -> int:
    from .report import rebuild

    path = rebuild(args.run_dir)
    print(f"report rebuilt: {path} and {path.with_name('report.html')}")
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser("bench", help="measure checkpoints (or model sources, ONNX folders, GGUF files) on backends")
    p.add_argument("targets", nargs="+", metavar="CKPT_OR_ONNX",
                   help="checkpoint dirs, ONNX dirs, model sources, or GGUF files (llamacpp-cpu, with --baseline)")
    p.add_argument("--backends", help=f"comma list of {', '.join(BACKENDS)} (default: each target on its own "
                   "runtime: ort-cpu for ONNX models, llamacpp-cpu for GGUF files, torch-cpu for the rest)")
    p.add_argument("--quality", default="perplexity,accuracy,teacher-agreement",
                   help="comma list of perplexity, accuracy, teacher-agreement (each where the task allows)")
    p.add_argument("--baseline", help="reference model for teacher-agreement and ratios (checkpoint or source)")
    p.add_argument("--task", choices=["causal-lm", "sequence-classification", "feature-extraction"],
                   help="needed only for model sources / ONNX folders whose task cannot be read from config.json")
    p.add_argument("--data", help="eval data source (default: builtin:wikipedia for LMs, builtin:bbc-news else)")
    p.add_argument("--split", choices=["train", "validation", "test", "all"], help="split of the eval data")
    p.add_argument("--max-tokens", type=int, help="eval token cap (LMs; of --data or the default)")
    p.add_argument("--max-examples", type=int, help="eval example cap (encoders)")
    p.add_argument("--max-length", type=int, help="truncation length of encoder eval inputs")
    p.add_argument("--window", type=int, help="perplexity window (default: 256)")
    p.add_argument("--stride", type=int, help="perplexity stride (default: the window)")
    p.add_argument("--eval-batch", type=int, help="sequences per forward pass when scoring")
    p.add_argument("--threads", type=int, help="intra-op threads (default: all cores); recorded")
    p.add_argument("--batch", type=int, help="decoder latency: prompts at once")
    p.add_argument("--prompt-tokens", type=int, help="decoder latency: prompt length")
    p.add_argument("--new-tokens", type=int, help="decoder latency: greedy tokens")
    p.add_argument("--seq-tokens", type=int, help="encoder latency: input length")
    p.add_argument("--throughput-batch", type=int, help="encoder latency: throughput batch")
    p.add_argument("--warmup", type=int, help="untimed runs")
    p.add_argument("--repeats", type=int, help="timed runs")
    p.add_argument("--rounds", type=int, help="timing rounds, the rows taking turns (default 1)")
    p.add_argument("--no-latency", action="store_true", help="quality, memory and size only")
    p.add_argument("--output", default="runs/bench", help="writes results.json, report.md/html here")
    p.add_argument("--work-dir", help="cache of inputs, references, exports (default: OUTPUT/.bench)")
    p.add_argument("--title", help="report title")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--verbose", action="store_true", help="show other libraries' warnings here too (they always "
                   "go to OUTPUT/bench.log)")
    p.set_defaults(func=cmd_bench, command_text=None)

    p = sub.add_parser("report", help="rebuild report.md / report.html / plots from RUN_DIR/results.json")
    p.add_argument("run_dir", help="a directory with results.json (a run or a bench output)")
    p.set_defaults(func=cmd_report)
