"""Other libraries' warnings and log records go to a run's log file, and to the terminal only when verbose.

`capture(path, verbose)` routes, for as long as it is open:
- Python warnings (torch deprecations, transformers' FutureWarnings, ...) through `logging` (each once per
  place it is raised);
- every logger, including transformers' and optimum's, which keep their own stderr handler and do not
  propagate by default (they are re-routed when already imported, or as soon as they are);
into `path` (level INFO and above, appended), and onto stderr (WARNING and above) only with `verbose`.
ONNX Runtime's own C++ log (which writes to the process's stderr) is held at ERROR unless verbose.

The suite's own progress bars (tqdm) and messages (`print`) are untouched. The settings travel to child
processes (the benchmark workers) in the environment: `capture_from_env()` there appends to the same file.

Imports nothing heavy: `compress.edge` users and the ONNX Runtime worker never load torch through it."""
from __future__ import annotations

import contextlib
import importlib.abc
import importlib.machinery
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Callable, Iterator

ENV_LOG = "COMPRESS_RUN_LOG"
ENV_VERBOSE = "COMPRESS_VERBOSE"
SUITE_LOGGER = "compress.run"  # the suite's own messages, written to the log file beside the terminal
_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_LIBRARY_LOGGING = ("transformers.utils.logging", "optimum.utils.logging")


def _route_library(module) -> Callable[[], None]:
    """Send a transformers-style library's records to the root logger; return the undo."""
    module.disable_default_handler()
    module.enable_propagation()

    def undo():
        module.enable_default_handler()
        module.disable_propagation()

    return undo


def _quiet_onnxruntime(module) -> Callable[[], None]:
    try:
        module.set_default_logger_severity(3)  # errors only
    except Exception:  # pragma: no cover - an ORT without the call
        return lambda: None
    return lambda: module.set_default_logger_severity(2)


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs a callback on a module right after it is first imported (the library configures its logger
    at import time, so it has to be re-routed then)."""

    def __init__(self, callbacks: dict[str, Callable]):
        self.callbacks = callbacks
        self.undos: list[Callable[[], None]] = []

    def find_spec(self, name, path, target=None):
        callback = self.callbacks.get(name)
        if callback is None:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        exec_module = loader.exec_module

        def exec_and_route(module):
            exec_module(module)
            self.callbacks.pop(name, None)
            try:
                self.undos.append(callback(module))
            except Exception:  # never break an import over logging
                pass

        loader.exec_module = exec_and_route
        return spec


@contextlib.contextmanager
def capture(path: str | os.PathLike, verbose: bool = False) -> Iterator[Path]:
    """Route other libraries' warnings and log records into `path` (see the module's docstring)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    file_handler = logging.FileHandler(path, mode="a", encoding="utf-8")
    file_handler.setLevel(logging.INFO)
    file_handler.setFormatter(logging.Formatter(_FORMAT))
    handlers: list[logging.Handler] = [file_handler]
    if verbose:
        terminal = logging.StreamHandler(sys.stderr)
        terminal.setLevel(logging.WARNING)
        terminal.setFormatter(logging.Formatter("%(name)s: %(levelname)s: %(message)s"))
        handlers.append(terminal)
    root = logging.getLogger()
    root_level = root.level
    for h in handlers:
        root.addHandler(h)
    root.setLevel(logging.INFO)
    # Libraries that print through a handler of their own (not through the root logger).
    callbacks: dict[str, Callable] = {name: _route_library for name in _LIBRARY_LOGGING}
    if not verbose:
        callbacks["onnxruntime"] = _quiet_onnxruntime
    hook = _AfterImport({})
    for name, callback in callbacks.items():
        if name in sys.modules:
            hook.undos.append(callback(sys.modules[name]))
        else:
            hook.callbacks[name] = callback
    sys.meta_path.insert(0, hook)
    env_before = {k: os.environ.get(k) for k in (ENV_LOG, ENV_VERBOSE)}
    os.environ[ENV_LOG], os.environ[ENV_VERBOSE] = str(path.resolve()), "1" if verbose else "0"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default")  # every warning once per place, deprecations included
            logging.captureWarnings(True)
            try:
                yield path
            finally:
                logging.captureWarnings(False)
    finally:
        with contextlib.suppress(ValueError):
            sys.meta_path.remove(hook)
        for undo in reversed(hook.undos):
            with contextlib.suppress(Exception):
                undo()
        for h in handlers:
            root.removeHandler(h)
        root.setLevel(root_level)
        file_handler.close()
        for k, v in env_before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def capture_from_env() -> contextlib.AbstractContextManager:
    """In a child process: the capture its parent asked for through the environment, else a no-op."""
    path = os.environ.get(ENV_LOG)
    if not path:
        return contextlib.nullcontext()
    return capture(path, verbose=os.environ.get(ENV_VERBOSE) == "1")


def suite_log(message: str) -> None:
    """Record one of the suite's own messages in the log file (the caller prints it)."""
    logging.getLogger(SUITE_LOGGER).info(message)
