"""The `compress` command line. Exit codes: 0 ok, 2 bad input, 1 failure."""
from __future__ import annotations

import argparse
import errno
import json
import sys
import traceback

from compress.errors import CompressInputError

EXIT_OK, EXIT_FAILURE, EXIT_BAD_INPUT = 0, 1, 2
# A read-only, full or forbidden folder: exit 1 with one line, not a traceback.
DISK_ERRNOS = {errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EFBIG}


def _cmd_run(args) -> int:
    from compress.logs import capture, suite_log

    from .config import load_config
    from .console import log, print_summary
    from .runner import Runner

    pipeline = load_config(args.config, args.set)
    runner = Runner(pipeline, output_dir=args.output_dir, show_progress=not args.no_progress, log=log)
    # other libraries' warnings and notices go to run.log (and to the terminal only with --verbose)
    with capture(runner.run_dir / "run.log", verbose=args.verbose):
        suite_log(f"compress {' '.join(sys.argv[1:]) or 'run ' + str(args.config)}")
        result = runner.run()
    print_summary(result, pipeline.config)
    return EXIT_OK


def _cmd_validate(args) -> int:
    from .config import load_config

    pipeline = load_config(args.config, args.set)
    cfg = pipeline.config
    print(f"{args.config}: ok - {cfg.name}: {cfg.model.source} ({cfg.task}), "
          f"passes: {' -> '.join(p.name for p in pipeline.passes) or 'none'}")
    return EXIT_OK


def _cmd_passes(args) -> int:
    from .listing import list_passes

    print(list_passes(args.name, as_json=args.json))
    return EXIT_OK


def _cmd_schema(args) -> int:
    from .config import json_schema

    text = json.dumps(json_schema(), indent=2)
    if args.output:
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
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--verbose", action="store_true", help="also show other libraries' warnings and notices "
                   "(always kept in runs/<name>/run.log)")
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("validate", help="check a config without running it")
    with_config(p)
    p.set_defaults(func=_cmd_validate)

    p = sub.add_parser("passes", help="list the passes and every option with its default")
    p.add_argument("name", nargs="?", help="only this pass")
    p.add_argument("--json", action="store_true", help="as JSON, for tools")
    p.set_defaults(func=_cmd_passes)

    p = sub.add_parser("schema", help="print the JSON Schema of pipeline configs")
    p.add_argument("-o", "--output", help="write to this file")
    p.set_defaults(func=_cmd_schema)

    try:  # the harness adds `bench` and `report`
        from benchmarks.cli import add_commands
    except ImportError:
        pass
    else:
        add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except CompressInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_FAILURE
    except OSError as exc:
        if exc.errno not in DISK_ERRNOS:
            traceback.print_exc()
        else:  # the environment, not a bug: one line naming the path and the cause
            print(f"error: {exc.filename or 'the output folder'}: {exc.strerror} "
                  f"({errno.errorcode.get(exc.errno, exc.errno)}); free space or fix the folder's permissions, "
                  "then run again (finished steps are reused)", file=sys.stderr)
        return EXIT_FAILURE
    except Exception:  # a bug or an environment failure, with the trace for the report
        traceback.print_exc()
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
