"""The `compress` command line. Exit codes: 0 ok, 2 bad input, 1 failure."""
from __future__ import annotations

import argparse
import errno
import json
import math
import os
import signal
import sys
import threading
import traceback
from pathlib import Path

from compress.errors import ConfigError, CompressError, CompressInputError, disk_error

EXIT_OK, EXIT_FAILURE, EXIT_BAD_INPUT = 0, 1, 2


def _cmd_run(args) -> int:
    from compress.logs import capture, suite_log
    from compress.runtime import output_folder

    from .config import load_config
    from .console import log, print_summary
    from .runner import Runner
    from .search.config import is_search_config

    if _is_search(args.config, is_search_config):
        raise ConfigError(f"{args.config} is a search config (objectives, constraints or {{search: ...}} options): "
                          f"run it with `compress search {args.config}`, or run the recipe a search chose with "
                          "`compress run runs/<name>/search/best.yaml`")
    pipeline = load_config(args.config, args.set)
    cfg = pipeline.config
    option = "--output-dir" if args.output_dir else "output_dir:"
    _check_run_folder(args.output_dir or cfg.output_dir, option, cfg.name, cfg.model.source)
    _check_sources_outside(pipeline, Path(args.output_dir or cfg.output_dir) / cfg.name)
    output_folder(args.output_dir or cfg.output_dir, option)
    # progress bars on a terminal only: piped or redirected output gets the log lines, not redrawn bars
    runner = Runner(pipeline, output_dir=args.output_dir, show_progress=not args.no_progress and sys.stderr.isatty(),
                    log=log, remeasure=args.remeasure)
    if runner.run_dir.exists() and not runner.run_dir.is_dir():
        raise ConfigError(f"{runner.run_dir}: is a file, and the run {pipeline.config.name!r} writes its folder there; "
                          "move the file, or give the run another name or --output-dir")
    # The folder's lock before its log: a run that is refused never writes into another run's folder.
    # Other libraries' warnings and notices go to run.log (and to the terminal only with --verbose).
    with runner.lock(wait=args.wait), capture(runner.run_dir / "run.log", verbose=args.verbose):
        suite_log(f"compress {' '.join(sys.argv[1:]) or 'run ' + str(args.config)}")
        result = runner.run()
    print_summary(result, pipeline.config)
    results = runner.run_dir / "results.json"
    if pipeline.config.benchmark is not None and results.is_file():
        failed = [f"{r.get('label')} on {r.get('backend')}" for r in json.loads(results.read_text())["records"]
                  if "error" in r]
        if failed:  # the checkpoints stand; the figures a user asked for are missing
            print(f"error: the benchmark failed for {', '.join(failed)} (the reasons are above and in the report); "
                  "the checkpoints are written", file=sys.stderr)
            return EXIT_FAILURE
    return EXIT_OK


def _check_run_folder(output_dir: str, option: str, name: str, source: str) -> None:
    """ConfigError, before anything is written, when the run folder <output_dir>/<name> (which a search's folder
    lies in) is or lies inside a checkpoint: the run's files would not be in its manifest, so it would refuse to
    load. Also when it is the model source's folder or lies inside it: the run's files would change the
    source's fingerprint, so every run would compute every step again."""
    from compress.checkpoint import MANIFEST, enclosing_checkpoint

    run_dir = Path(output_dir) / name
    at = run_dir.expanduser().resolve()
    ckpt = enclosing_checkpoint(run_dir)
    if ckpt == at:
        raise ConfigError(f"name: the run folder {run_dir} is a checkpoint ({MANIFEST}); the run's files would "
                          "not be in its manifest and it would refuse to load; give the run another name, or "
                          f"another {option.rstrip(':')}")
    if ckpt is not None:
        raise ConfigError(f"{option} {output_dir}: is inside the checkpoint {ckpt}; the run's files would not be "
                          "in its manifest and it would refuse to load; give a folder outside it, e.g. runs")
    if source.startswith(("builtin:", "hf:")) or not Path(source).expanduser().is_dir():
        return
    src = Path(source).expanduser().resolve()
    if at == src or src in at.parents:
        raise ConfigError(f"{option} {output_dir}: the run folder {run_dir} would be in the model source {source} "
                          "(model.source), whose folder would then change with every run; give a folder outside "
                          "it, e.g. runs, or another name")


def _check_sources_outside(pipeline, run_dir: Path) -> None:
    """ConfigError when model.source or a distill teacher lies in the run folder: the run replaces its step
    folders and removes the ones that are no longer steps of the pipeline, so it would overwrite or delete it."""
    at = run_dir.expanduser().resolve()
    chains = [("passes", pipeline.passes)] + [(f"branches.{b.name}.passes", b.passes) for b in pipeline.branches]
    sources = [("model.source", pipeline.config.model.source)]
    for where, passes in chains:
        for i, p in enumerate(passes):
            teacher = getattr(p.config, "teacher", None)
            entries = [teacher] if isinstance(teacher, str) else [t.model for t in teacher or []]
            sources += [(f"{where}.{i}.{p.name}.teacher", t) for t in entries]
    for field, source in sources:
        path = Path(source).expanduser()
        if source in ("source", "input") or source.startswith(("builtin:", "hf:")) or not path.is_dir():
            continue
        if path.resolve() == at or at in path.resolve().parents:
            raise ConfigError(f"{field}: {source} lies in this run's folder {run_dir}, whose step folders the run "
                              "replaces or removes; copy it out of the run folder first, or give the run another "
                              "name")


def _cmd_validate(args) -> int:
    from .config import load_config
    from .search.config import is_search_config, load_search_config

    if _is_search(args.config, is_search_config):
        setup = load_search_config(args.config, args.set)
        size = setup.space.size()
        print(f"{args.config}: ok - search {setup.name}: {len(setup.space.params)} searched options "
              f"({size if size is not None else 'continuous'} combinations: "
              f"{', '.join(p.label for p in setup.space.params)}), objectives: "
              f"{', '.join(n for n, _ in setup.objectives)}")
        return EXIT_OK
    pipeline = load_config(args.config, args.set)
    cfg = pipeline.config
    branches = "".join(f"; branch {b.name}: {' -> '.join(p.name for p in b.passes) or 'none'}"
                       for b in pipeline.branches)
    print(f"{args.config}: ok - {cfg.name}: {cfg.model.source} ({cfg.task}), "
          f"passes: {' -> '.join(p.name for p in pipeline.passes) or 'none'}{branches}")
    return EXIT_OK


def _is_search(path, is_search_config) -> bool:
    """Whether the YAML file at `path` is a search config (an unreadable one is left to the loader's error)."""
    from .config import read_config_file

    try:
        return is_search_config(read_config_file(path))
    except ConfigError:
        return False


def _cmd_search(args) -> int:
    from compress.logs import capture, suite_log
    from compress.runtime import output_folder

    from .console import log
    from .search import run_search
    from .search.config import load_search_config
    from .search.report import summary
    from .search.study import search_dir

    for flag in ("trials", "minutes"):
        value = getattr(args, flag)
        if value is not None and not 0 < value < math.inf:  # nan too: it compares false with every number
            raise ConfigError(f"--{flag}: must be a finite number above 0 (got {value:g})")
    setup = load_search_config(args.config, args.set)  # every check before the log or the study exist
    study_dir = search_dir(setup, args.output_dir)
    if args.pick is not None and not args.storage and not (study_dir / "study.db").exists():
        raise ConfigError(f"--pick {args.pick}: there is no study at {study_dir} yet; run "
                          f"`compress search {args.config}` first (with the same --output-dir)")
    cfg = setup.pipeline.config
    option = "--output-dir" if args.output_dir else "output_dir:"
    _check_run_folder(args.output_dir or cfg.output_dir, option, setup.name, cfg.model.source)
    out = output_folder(study_dir, option)
    with capture(out / "search.log", verbose=args.verbose):
        suite_log(f"compress {' '.join(sys.argv[1:]) or 'search ' + str(args.config)}")
        outcome, search = run_search(args.config, overrides=args.set, trials=args.trials, minutes=args.minutes,
                                     pick=args.pick, storage=args.storage, output_dir=args.output_dir, log=log,
                                     runner_log=suite_log)
    if search.progress.stopped_by:
        print(f"stopped: {search.progress.stopped_by}")
    for line in summary(search.setup, outcome):
        print(line)
    files = outcome.files
    print(f"report: {files['report']} (and report.html, trials.json); log: {out / 'search.log'}")
    if "best" in files:
        print(f"recipe: {files['best']} (compress run {files['best']})")
    return EXIT_OK


def _cmd_passes(args) -> int:
    from .listing import list_passes

    print(list_passes(args.name, as_json=args.json))
    return EXIT_OK


def _cmd_schema(args) -> int:
    if args.search:
        from .search.config import json_schema
    else:
        from .config import json_schema

    text = json.dumps(json_schema(), indent=2)
    if args.output:
        if Path(args.output).is_dir():
            raise ConfigError(f"-o {args.output}: is a folder; give a file name, e.g. "
                              f"{Path(args.output) / 'schema.json'}")
        from compress.runtime import output_folder

        output_folder(Path(args.output).parent, f"-o {args.output}: its folder")
        with open(args.output, "w") as fh:
            fh.write(text + "\n")
    else:
        print(text)
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="compress", description="Compress language models with composable "
                                     "passes and measure every step.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_config(p):
        p.add_argument("config", help="pipeline config (YAML)")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config value, e.g. --set passes.0.distill.max_steps=5 (repeatable)")

    p = sub.add_parser("run", help="run a pipeline: passes, checkpoints, benchmarks, report")
    with_config(p)
    p.add_argument("--output-dir", help="write runs here instead of the config's output_dir")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (drawn only on a terminal)")
    p.add_argument("--verbose", action="store_true", help="also show other libraries' warnings and notices "
                   "(always kept in runs/<name>/run.log), and the traceback of a failure")
    p.add_argument("--wait", action="store_true", help="if another run holds the run folder, wait for it to "
                   "finish instead of refusing")
    p.add_argument("--remeasure", action="store_true", help="measure every row again, in this run, instead of "
                   "reusing the stored results of unchanged checkpoints (so every ratio compares rows timed side "
                   "by side)")
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("validate", help="check a config without running it")
    with_config(p)
    p.set_defaults(func=_cmd_validate)

    p = sub.add_parser("search", help="search the passes' options for the best recipes under constraints (Optuna)")
    with_config(p)
    p.add_argument("--trials", type=int, metavar="N", help="trials in the study in all (default: budget.trials); "
                   "a rerun resumes the study and adds trials up to N")
    p.add_argument("--minutes", type=float, metavar="M", help="stop starting trials after M minutes")
    p.add_argument("--pick", type=int, metavar="N", help="run no trials: write best.yaml and the report for trial N")
    p.add_argument("--storage", metavar="URL", help="Optuna storage shared by several search processes, e.g. "
                   "postgresql://user@host/db (default: sqlite in runs/<name>/search/study.db)")
    p.add_argument("--output-dir", help="write runs here instead of the config's output_dir")
    p.add_argument("--verbose", action="store_true", help="also show other libraries' warnings and notices")
    p.set_defaults(func=_cmd_search)

    p = sub.add_parser("passes", help="list the passes and every option with its default")
    p.add_argument("name", nargs="?", help="only this pass")
    p.add_argument("--json", action="store_true", help="as JSON, for tools")
    p.set_defaults(func=_cmd_passes)

    p = sub.add_parser("schema", help="print the JSON Schema of pipeline configs (or of search configs)")
    p.add_argument("-o", "--output", help="write to this file")
    p.add_argument("--search", action="store_true", help="the schema of search configs (`compress search`)")
    p.set_defaults(func=_cmd_schema)

    try:  # the harness adds `bench` and `report`
        from benchmarks.cli import add_commands
    except ImportError:
        pass
    else:
        add_commands(sub)
    return parser


class _Terminated(BaseException):
    """SIGTERM (a scheduler's stop, `kill`), raised so that the run's cleanup runs as on Ctrl-C."""


def _terminate(signum, frame):
    raise _Terminated


def _bad_path(exc: Exception) -> str | None:
    """What is wrong with a path no file system takes (too long, or holding a NUL byte), named wherever the
    suite met it (a name, output_dir, a model or data source, the config file, a bench target); else None."""
    if isinstance(exc, OSError) and exc.errno == errno.ENAMETOOLONG:
        return (f"{exc.filename or 'a path given'}: too long for the file system (over 255 bytes in one name, or "
                "4096 in all); give a shorter path or name")
    if isinstance(exc, ValueError) and "embedded null byte" in str(exc):
        return "a path given holds a NUL byte (\\0), which no file name can; remove it"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    verbose = getattr(args, "verbose", False)
    in_main_thread = threading.current_thread() is threading.main_thread()  # where signals can be caught
    previous = signal.signal(signal.SIGTERM, _terminate) if in_main_thread else None
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_FAILURE
    except _Terminated:
        print("terminated (SIGTERM)", file=sys.stderr)
        return EXIT_FAILURE
    except CompressInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except CompressError as exc:  # a failed run (e.g. a diverged training): its message, the trace if asked
        if verbose:
            traceback.print_exc()
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except BrokenPipeError:  # the reader went away (`compress schema | head`): nothing left to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILURE
    except Exception as exc:
        bad = _bad_path(exc)
        if bad:
            if verbose:
                traceback.print_exc()
            print(f"error: {bad}", file=sys.stderr)
            return EXIT_BAD_INPUT
        disk = disk_error(exc)  # an OSError, or safetensors' error type for the same causes
        if disk is None:  # a bug or an environment failure, with the trace for the report
            traceback.print_exc()
            return EXIT_FAILURE
        if verbose:
            traceback.print_exc()
        # the environment, not a bug: one line naming the path and the cause
        print(f"error: {disk.filename or 'the output folder'}: {disk.strerror} "
              f"({errno.errorcode.get(disk.errno, disk.errno)}); free space or fix the folder's permissions, "
              "then run again (finished steps are reused)", file=sys.stderr)
        return EXIT_FAILURE
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
