"""Exceptions. Bad input (config, paths, corrupted checkpoints, unsupported models) is a
`CompressInputError`; the CLI maps it to exit code 2 and anything else to 1 (another `CompressError`, such as a
diverged training, and a disk that refuses a write with one line; other errors with their traceback)."""
import errno
import os
import re

# A read-only, full or forbidden folder: the environment, not a bug (exit 1 with one line).
DISK_ERRNOS = frozenset({errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EFBIG})


class CompressError(Exception):
    """Base class of the suite's own errors."""


class CompressInputError(CompressError):
    """The user's input is wrong: the message names the field or file and the fix."""


class ConfigError(CompressInputError):
    """A pipeline config or pass option is invalid."""


class CheckpointError(CompressInputError):
    """A checkpoint directory is missing, incomplete or corrupted."""


class ModelSourceError(CompressInputError):
    """A model source cannot be resolved or loaded."""


class DataSourceError(CompressInputError):
    """A data source cannot be resolved or read."""


class UnsupportedModelError(CompressInputError):
    """A pass does not support this model (architecture, task or checkpoint kind)."""


class TrainingDivergedError(CompressError):
    """Training reached a non-finite loss: an option (learning rate, temperature, ...) needs changing. Not bad
    input as such (the options were valid), so the CLI exits 1, with this message and no traceback."""


class RunBusyError(CompressInputError):
    """Another run holds the run folder."""


def disk_error(exc: BaseException, path=None) -> OSError | None:
    """The OSError behind `exc` when a disk refused a write (errno in DISK_ERRNOS), else None: `exc` itself, or
    safetensors' `SafetensorError`, which carries the OS error only in its text ("... (os error 28)"), as an
    OSError naming `path` (the file or folder being written; else the path in the text, if any)."""
    if isinstance(exc, OSError):
        return exc if exc.errno in DISK_ERRNOS else None
    if type(exc).__name__ != "SafetensorError":
        return None
    found = re.search(r"\(os error (\d+)\)", str(exc))
    code = int(found.group(1)) if found else None
    if code not in DISK_ERRNOS:
        return None
    at = re.search(r'at path "([^"]*)"', str(exc))
    return OSError(code, os.strerror(code), str(path) if path is not None else at.group(1) if at else None)


def _model_at(model_cls, loc):
    """The pydantic model class that holds the field at `loc` (best effort, for suggestions)."""
    import typing

    from pydantic import BaseModel

    current = model_cls
    for part in loc:
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return None
        field = current.model_fields.get(part) if isinstance(part, str) else None
        if field is None:
            return current if part == loc[-1] else None
        ann = field.annotation
        for _ in range(3):  # unwrap Optional[...] / list[...] / Union
            args = [a for a in typing.get_args(ann) if a is not type(None)]
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                break
            ann = args[0] if args else ann
        current = ann
    return current


_UNION_MEMBERS = {"str", "int", "float", "bool", "list", "dict", "none"}


def format_validation_error(exc, model_cls=None, prefix: str = "") -> str:
    """One line per problem: the field path, the bad value, what is allowed and (for typos) a suggestion."""
    import difflib

    found = []  # (field path, a type mismatch?, message)
    for err in exc.errors():
        # pydantic names the member of a union it tried ("str", "dict[str,...]", "function-after[...]"): no field
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and ("[" in p or p in _UNION_MEMBERS)))
        where = prefix + ".".join(str(p) for p in loc) if loc else prefix.rstrip(".") or "config"
        kind = err["type"]
        if kind == "extra_forbidden":
            holder = _model_at(model_cls, loc[:-1]) if model_cls else None
            allowed = sorted(f.alias or name for name, f in (getattr(holder, "model_fields", {}) or {}).items())
            near = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
            scope = getattr(holder, "options_of", "")
            msg = f"{where}: unknown option {loc[-1]!r}" + (f" for {scope}" if scope else "")
            if near:
                msg += f"; did you mean {near[0]!r}?"
            if allowed:
                msg += f" (allowed: {', '.join(allowed)})"
        elif kind == "missing":
            msg = f"{where}: required option is missing"
        elif kind == "string_pattern_mismatch":  # the run and branch names: folder names
            msg = (f"{where}: {err.get('input')!r} is not a folder name this suite takes: letters, digits, '.', '_' "
                   "and '-', starting with a letter or digit")
        else:
            text = err["msg"].removeprefix("Value error, ")
            got = f"(got {err.get('input')!r}"
            msg = f"{where}: {text}" + ("" if got in text else f" {got})")
        found.append((where, kind.endswith("_type"), msg))
    # A union's other member failing on the value's type ("should be a valid string") says nothing when the
    # member that took the value reports a problem inside it.
    return "\n".join(msg for where, type_error, msg in found
                     if not (type_error and any(w.startswith(where + ".") for w, _, _ in found)))
