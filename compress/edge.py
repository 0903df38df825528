"""Run an exported checkpoint with ONNX Runtime alone: numpy, onnxruntime and tokenizers, never torch.

This file is self-contained on purpose. The export pass copies it into every ONNX checkpoint as
``edge_runner.py``, so a device that has only ``pip install onnxruntime numpy tokenizers`` can run

    python DIR/edge_runner.py DIR "Once upon a time" --max-new-tokens 32     # causal LM
    python DIR/edge_runner.py DIR "Some news text" --classify               # classifier
    python DIR/edge_runner.py DIR "A sentence" --embed                      # sentence embedding

or, from Python, ``EdgeModel(dir).generate_text("Once upon a time", 32)``. Inside the suite it is
``compress.edge``, whose import loads no torch either (``compress/__init__.py`` imports lazily).

A decoder exported with past key values is one ``model.onnx`` used for both phases. Two loops run it:
- the plain loop (any decoder graph): prefill feeds an empty past (length 0), each decode step feeds the
  presents of the previous call back as the past, so every step copies the whole cache;
- the shared-cache loop (graphs written by compress.fused, marked ``compress.graph: fused``): each layer's
  keys and values live in one preallocated buffer bound (IO binding) as both past input and present output,
  and GroupQueryAttention writes each new token's entries in place: no copy of the cache per step. The
  buffer grows (doubling, one copy) only when a sequence outgrows it. ``EdgeModel(dir, shared_cache=False)``
  runs such a graph with the plain loop, the reference the tests compare with.
"""
from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort

__all__ = ["EdgeModel", "DecodeState"]

_NP_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
             "tensor(int32)": np.int32, "tensor(bool)": np.bool_}


# RoBERTa-style position ids start after the padding index: pad_token_id + 1 positions of the table are unused
OFFSET_POSITIONS = ("roberta", "xlm-roberta", "camembert")


class DecodeState:
    """What a decoder carries between steps: the attention mask so far and the past keys/values.

    In the shared-cache loop `past` holds the buffers ([B, kv heads, capacity, head dim], valid up to
    `length`) and `binding` the IO binding that has them bound as past and present."""

    def __init__(self, attention_mask: np.ndarray, past: dict[str, np.ndarray], binding=None):
        self.attention_mask = attention_mask  # [B, tokens so far], int64
        self.past = past  # input name (past_key_values.N.key/value) -> array
        self.binding = binding

    @property
    def length(self) -> int:
        return int(self.attention_mask.shape[1])


class EdgeModel:
    """An exported checkpoint directory (model.onnx, config.json, tokenizer.json, manifest.json)."""

    HEADROOM = 256  # decode steps a prefill reserves cache room for, when the caller does not say

    def __init__(self, path: str | os.PathLike, providers: list[str] | None = None, threads: int | None = None,
                 session_options: "ort.SessionOptions | None" = None, shared_cache: bool | None = None,
                 verify: bool | None = None):
        """`verify`: check the files against manifest.json's sizes and sha256; None: where there is a manifest.json
        (a compress bundle; a bare ONNX folder has none to check), True: a folder without one is refused."""
        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(f"{self.path} not found: give the directory of an exported checkpoint")
        onnx_file = self.path / "model.onnx" if self.path.is_dir() else self.path
        if self.path.is_file():
            self.path = self.path.parent
        self.manifest = _read_json(self.path, "manifest.json")  # refuses a pipe, a folder, a link out of the folder
        bundle = (self.path / "manifest.json").exists()  # not its "files": deleting them would skip the check
        check = bundle if verify is None else verify
        if check and (bundle or onnx_file.exists()):  # a folder with neither is no bundle: said below
            # first: a listed model.onnx that is gone is named as missing
            _verify_files(self.path, self.manifest, onnx_file.name)
        if not onnx_file.exists():
            raise FileNotFoundError(f"{onnx_file} not found: give the directory of an exported checkpoint")
        self.config = _read_json(self.path, "config.json")
        opts = session_options or ort.SessionOptions()  # e.g. with profiling enabled
        if threads:
            opts.intra_op_num_threads = int(threads)
            opts.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(onnx_file), sess_options=opts,
                                            providers=providers or ["CPUExecutionProvider"])
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.past_names = [n for n in self.inputs if n.startswith("past_key_values.")]
        self.task = self.manifest.get("task") or self._guess_task()
        meta = self.session.get_modelmeta().custom_metadata_map
        fused = meta.get("compress.graph") == "fused"
        if shared_cache and not fused:
            raise ValueError("shared_cache needs a graph written by compress.fused (GroupQueryAttention); this "
                             "one concatenates its past, so it runs with the plain loop")
        self.fused = fused  # positions come from the token count: batches must be unpadded
        self.shared_cache = fused if shared_cache is None else shared_cache
        # past the positions the model holds ONNX Runtime fails mid-run (a rotary cache too short) or a learned
        # position table is read out of range
        self.max_length, self.max_length_source = max_positions(meta, self.config)
        # a longrope graph: past these positions a run takes the long factors, and generate recomputes the cache
        self.longrope_short = int(meta["compress.longrope_short_positions"]) if meta.get(
            "compress.longrope_short_positions") else None
        self._tokenizer = None

    # ------------------------------------------------------------------ shape helpers
    def _guess_task(self) -> str:
        if "last_hidden_state" in self.output_names:
            return "feature-extraction"
        if self.past_names or "position_ids" in self.inputs:
            return "causal-lm"
        return "sequence-classification"

    def _feed(self, input_ids: np.ndarray, attention_mask: np.ndarray | None) -> dict[str, np.ndarray]:
        input_ids = np.asarray(input_ids, dtype=np.int64)
        if input_ids.ndim == 1:
            input_ids = input_ids[None, :]
        vocab = self.config.get("vocab_size")  # ONNX Runtime's Gather reads a negative id from the table's end
        if vocab and input_ids.size and not 0 <= input_ids.min() <= input_ids.max() < vocab:
            raise ValueError(f"token ids must be in 0..{vocab - 1} (vocab_size in config.json); got "
                             f"{input_ids.min()}..{input_ids.max()}")
        self._check_length(input_ids.shape[1])  # else ONNX Runtime reads past the position table
        mask = np.ones_like(input_ids) if attention_mask is None else np.asarray(attention_mask, dtype=np.int64)
        if mask.ndim == 1:
            mask = mask[None, :]
        feed = {"input_ids": input_ids}
        if "attention_mask" in self.inputs:
            feed["attention_mask"] = mask
        if "token_type_ids" in self.inputs:
            feed["token_type_ids"] = np.zeros_like(input_ids)
        return feed

    def _empty_past(self, batch: int) -> dict[str, np.ndarray]:
        past = {}
        for name in self.past_names:
            meta = self.inputs[name]
            # [batch, kv heads, past length, head dim]; the two middle-free dims are fixed numbers
            _, heads, _, head_dim = meta.shape
            past[name] = np.zeros((batch, heads, 0, head_dim), dtype=_NP_TYPES.get(meta.type, np.float32))
        return past

    def _run_decoder(self, input_ids: np.ndarray, mask_so_far: np.ndarray, past: dict[str, np.ndarray],
                     keep: int = 0):
        """One call: `input_ids` [B, T] new tokens, `mask_so_far` [B, past + T]; returns (logits, presents).
        `keep`: logits of the last `keep` positions only (0: all), where the graph takes logits_to_keep."""
        self._check_unpadded(mask_so_far)
        self._check_length(mask_so_far.shape[1])
        feed = {"input_ids": input_ids}
        if "attention_mask" in self.inputs:
            feed["attention_mask"] = mask_so_far
        if "logits_to_keep" in self.inputs:
            feed["logits_to_keep"] = np.array([keep], np.int64)
        if "position_ids" in self.inputs:
            # Positions count real tokens only, so left-padded batches line up with unpadded ones.
            positions = np.cumsum(mask_so_far, axis=1) - 1
            positions = np.where(mask_so_far == 0, 1, positions)
            feed["position_ids"] = positions[:, -input_ids.shape[1]:].astype(np.int64)
        if "use_cache_branch" in self.inputs:  # a merged decoder (optimum's decoder_model_merged)
            feed["use_cache_branch"] = np.array([bool(past) and next(iter(past.values())).shape[2] > 0])
        feed.update(past)
        outputs = self.session.run(None, feed)
        named = dict(zip(self.output_names, outputs))
        presents = {name: named[name.replace("past_key_values.", "present.")] for name in self.past_names}
        return named["logits"], presents

    def _check_unpadded(self, mask: np.ndarray) -> None:
        if self.fused and not mask.all():
            raise ValueError("this fused decoder graph takes unpadded batches (GroupQueryAttention derives "
                             "positions from the token count); run padded prompts one at a time")

    def _check_length(self, tokens: int, new_tokens: int = 0) -> None:
        """ValueError unless `tokens` (+ `new_tokens` to generate) fit the positions the model holds."""
        if self.max_length is None or tokens + new_tokens <= self.max_length:
            return
        most = self.max_length
        if new_tokens and tokens < most:
            fix = f"ask for at most {most - tokens} new tokens (max_new_tokens, --max-new-tokens) or shorten the prompt"
        elif new_tokens < most:
            fix = f"shorten the {'prompt' if new_tokens else 'input'} to at most {most - new_tokens} tokens"
        else:
            fix = f"ask for fewer than {most} new tokens and shorten the prompt"
        raise ValueError(f"{tokens} tokens{f' + {new_tokens} new ones' if new_tokens else ''} need more positions "
                         f"than the {most} this model holds ({self.max_length_source}): {fix}")

    def _buffers(self, batch: int, capacity: int, old: DecodeState | None = None):
        """Zeroed cache buffers of `capacity` positions (holding `old`'s valid entries) and an IO binding
        with each bound as both past input and present output (bound once, reused every step)."""
        past = {}
        for name in self.past_names:
            _, heads, _, head_dim = self.inputs[name].shape
            dtype = _NP_TYPES.get(self.inputs[name].type, np.float32)
            past[name] = np.zeros((batch, heads, capacity, head_dim), dtype)
            if old is not None:
                past[name][:, :, : old.length] = old.past[name][:, :, : old.length]
        binding = self.session.io_binding()
        binding.bind_output("logits", "cpu")  # first, so it stays output 0 when bound again
        if "logits_to_keep" in self.inputs:  # the loop reads the last position's logits only
            binding.bind_cpu_input("logits_to_keep", np.array([1], np.int64))
        for name, buf in past.items():
            value = ort.OrtValue.ortvalue_from_numpy(buf)  # aliases the numpy buffer, no copy
            binding.bind_ortvalue_input(name, value)
            binding.bind_ortvalue_output(name.replace("past_key_values.", "present."), value)
        return past, binding

    def _run_shared(self, input_ids: np.ndarray, state: DecodeState) -> np.ndarray:
        """One call of the shared-cache loop: the buffers are both past and present (written in place)."""
        self._check_unpadded(state.attention_mask)
        self._check_length(state.attention_mask.shape[1])
        state.binding.bind_cpu_input("input_ids", input_ids)
        state.binding.bind_cpu_input("attention_mask", state.attention_mask)
        state.binding.bind_output("logits", "cpu")  # unallocated again: its shape changes between calls
        self.session.run_with_iobinding(state.binding)
        return state.binding.get_outputs()[0].numpy()

    # ------------------------------------------------------------------ the contract
    def logits(self, input_ids, attention_mask=None) -> np.ndarray:
        """Full-sequence logits [B, T, V] for a causal LM; class logits [B, C] for a classifier."""
        feed = self._feed(input_ids, attention_mask)
        if self.task == "causal-lm":
            batch = feed["input_ids"].shape[0]
            mask = feed.get("attention_mask", np.ones_like(feed["input_ids"]))
            logits, _ = self._run_decoder(feed["input_ids"], mask, self._empty_past(batch))
            return logits
        named = dict(zip(self.output_names, self.session.run(None, feed)))
        if "logits" not in named:
            raise ValueError(f"this model ({self.task}) has no logits output; outputs: {self.output_names}")
        return named["logits"]

    def hidden_states(self, input_ids, attention_mask=None) -> np.ndarray:
        if "last_hidden_state" not in self.output_names:  # before the run, which fails on a decoder's unfed past
            raise ValueError(f"this model ({self.task}) has no last_hidden_state output; outputs: "
                             f"{self.output_names}")
        feed = self._feed(input_ids, attention_mask)
        named = dict(zip(self.output_names, self.session.run(None, feed)))
        return named["last_hidden_state"]

    def embed(self, input_ids, attention_mask=None) -> np.ndarray:
        """Mean-pooled sentence embeddings [B, H] (as sentence-transformers pools MiniLM)."""
        hidden = self.hidden_states(input_ids, attention_mask)
        mask = np.ones(hidden.shape[:2], dtype=np.int64) if attention_mask is None else np.asarray(attention_mask)
        mask = mask[..., None].astype(hidden.dtype)
        return (hidden * mask).sum(1) / np.clip(mask.sum(1), 1e-9, None)

    def prefill(self, input_ids, attention_mask=None,
                max_new_tokens: int | None = None) -> tuple[np.ndarray, DecodeState]:
        """Process a prompt: (logits of its last position [B, V], state for decode_step). `max_new_tokens`
        sizes the shared cache (default HEADROOM; it grows if a sequence outgrows it)."""
        self._require_past()
        feed = self._feed(input_ids, attention_mask)
        if feed["input_ids"].shape[1] == 0:
            raise ValueError("the prompt is empty (no tokens): give some text to continue")
        mask = feed.get("attention_mask", np.ones_like(feed["input_ids"]))
        if self.shared_cache:
            past, binding = self._buffers(mask.shape[0], mask.shape[1] + (max_new_tokens or self.HEADROOM))
            state = DecodeState(mask, past, binding)
            return self._run_shared(feed["input_ids"], state)[:, -1, :], state
        logits, presents = self._run_decoder(feed["input_ids"], mask, self._empty_past(mask.shape[0]), keep=1)
        return logits[:, -1, :], DecodeState(mask, presents)

    def decode_step(self, next_ids, state: DecodeState) -> tuple[np.ndarray, DecodeState]:
        """Feed one new token per row ([B, 1]) with the cache: (logits [B, V], the new state). In the
        shared-cache loop the returned state shares (and the call has updated) `state`'s buffers."""
        next_ids = np.asarray(next_ids, dtype=np.int64).reshape(-1, 1)
        mask = np.concatenate([state.attention_mask, np.ones_like(next_ids)], axis=1)
        if state.binding is not None:
            capacity = next(iter(state.past.values())).shape[2]
            past, binding = state.past, state.binding
            if mask.shape[1] > capacity:  # outgrown: double the buffers, copying once
                past, binding = self._buffers(mask.shape[0], 2 * capacity, state)
            new = DecodeState(mask, past, binding)
            return self._run_shared(next_ids, new)[:, -1, :], new
        logits, presents = self._run_decoder(next_ids, mask, state.past, keep=1)
        return logits[:, -1, :], DecodeState(mask, presents)

    def generate(self, prompt_ids, max_new_tokens: int = 32, attention_mask=None,
                 eos_token_id: int | list[int] | None = None) -> np.ndarray:
        """Greedy decoding with the KV cache. Returns prompt + new tokens [B, T + n] (like HF generate);
        with `eos_token_id` (one id or several), stops once every row has produced one (finished rows are
        padded with the first). A longrope graph holding both factors runs the whole sequence again once it grows
        past the short factors' positions, as transformers' Phi-3 generation does."""
        eos = np.atleast_1d(np.asarray([] if eos_token_id is None else eos_token_id, dtype=np.int64))
        prompt = np.asarray(prompt_ids, dtype=np.int64)
        if prompt.ndim == 1:
            prompt = prompt[None, :]
        if max_new_tokens < 0:  # the shared cache would be sized below the prompt
            raise ValueError(f"max_new_tokens must be at least 0 (got {max_new_tokens})")
        self._check_length(prompt.shape[1], max_new_tokens)  # before any work, not at the step that fails
        logits, state = self.prefill(prompt, attention_mask, max_new_tokens=max_new_tokens)
        out, done = [], np.zeros(prompt.shape[0], dtype=bool)
        for step in range(max_new_tokens):
            nxt = logits.argmax(-1).astype(np.int64)
            if eos.size:
                nxt = np.where(done, eos[0], nxt)
                done |= np.isin(nxt, eos)
            out.append(nxt)
            if step == max_new_tokens - 1 or (eos.size and done.all()):
                break
            if state.length == self.longrope_short:  # as transformers' Phi-3: the whole sequence again, long factors
                seen = np.concatenate([prompt, np.stack(out, axis=1)], axis=1)
                mask = np.concatenate([state.attention_mask, np.ones_like(nxt[:, None])], axis=1)
                logits, state = self.prefill(seen, mask, max_new_tokens=max_new_tokens - step - 1)
                continue
            logits, state = self.decode_step(nxt[:, None], state)
        return np.concatenate([prompt, np.stack(out, axis=1)], axis=1) if out else prompt

    def _require_past(self) -> None:
        if self.task != "causal-lm":
            raise ValueError(f"generation needs a causal LM; this checkpoint is {self.task}")
        if not self.past_names:
            raise ValueError("this causal LM was exported without past key values (with_past: false), so it "
                             "cannot decode incrementally; use logits() or re-export with with_past: true")

    # ------------------------------------------------------------------ text level
    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from tokenizers import Tokenizer

            file = _regular(self.path, "tokenizer.json")
            if file is None:
                raise FileNotFoundError(f"{self.path / 'tokenizer.json'} not found: the checkpoint has no fast "
                                        "tokenizer")
            try:
                self._tokenizer = Tokenizer.from_file(str(file))
            except Exception as exc:  # noqa: BLE001 - tokenizers raises a bare Exception on a file it cannot parse
                raise ValueError(f"{file} cannot be read by tokenizers ({exc}): damaged, or written by a newer "
                                 "tokenizers than this one; copy the checkpoint again or upgrade tokenizers") from None
            tcfg = _read_json(self.path, "tokenizer_config.json")
            pad = _token_text(tcfg.get("pad_token"))
            if pad is not None and not isinstance(pad, str):
                raise ValueError(f"{self.path / 'tokenizer_config.json'}: pad_token is {pad!r}, not a token's text: "
                                 "edited by hand; copy the checkpoint again")
            limit = tcfg.get("model_max_length")
            if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int | float) or limit < 1):
                raise ValueError(f"{self.path / 'tokenizer_config.json'}: model_max_length is {limit!r}, not a "
                                 "positive number: edited by hand; copy the checkpoint again")
            pad_id = self._tokenizer.token_to_id(pad) if pad else None
            if pad_id is not None:
                self._tokenizer.enable_padding(pad_id=pad_id, pad_token=pad,
                                               direction="left" if self.task == "causal-lm" else "right")
            else:
                self._tokenizer.no_padding()
            most = self.max_length
            if self.task != "causal-lm" and most:
                self._tokenizer.enable_truncation(max_length=int(min(most, tcfg.get("model_max_length", most))))
        return self._tokenizer

    def encode(self, texts: str | list[str]) -> tuple[np.ndarray, np.ndarray]:
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not texts:  # np.array of no rows would read as one empty row
            raise ValueError("no texts given: give at least one")
        encs = self.tokenizer.encode_batch(texts)
        ids = np.array([e.ids for e in encs], dtype=np.int64)
        mask = np.array([e.attention_mask for e in encs], dtype=np.int64)
        return ids, mask

    def generate_text(self, prompt: str, max_new_tokens: int = 32) -> str:
        ids, mask = self.encode(prompt)
        # generation_config.json's ids first, as transformers' generate reads them (chat models list several)
        eos = _read_json(self.path, "generation_config.json").get("eos_token_id", self.config.get("eos_token_id"))
        listed = eos if isinstance(eos, list) else [] if eos is None else [eos]
        if not all(type(i) is int for i in listed):  # "2" or 2.5 read as an id, a dict raised a TypeError
            raise ValueError(f"eos_token_id is {eos!r} in {self.path / 'generation_config.json'} (or config.json): "
                             "an id is an integer, or a list of them; copy the checkpoint again")
        out = self.generate(ids, max_new_tokens, attention_mask=mask, eos_token_id=eos)
        return self.tokenizer.decode(out[0, ids.shape[1]:].tolist(), skip_special_tokens=True)

    def classify(self, texts: str | list[str]) -> list[tuple[str, float]]:
        """(label, probability) of the most likely class for each text."""
        if self.task == "causal-lm":  # its logits are per position, not per text
            raise ValueError("classify needs a sequence-classification model; this checkpoint is causal-lm")
        ids, mask = self.encode(texts)
        logits = self.logits(ids, mask).astype(np.float64)
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        names = self.config.get("id2label") or {}
        return [(names.get(str(int(i)), str(int(i))), float(p[i])) for i, p in zip(probs.argmax(-1), probs)]

    def embed_texts(self, texts: str | list[str]) -> np.ndarray:
        ids, mask = self.encode(texts)
        return self.embed(ids, mask)


def max_positions(meta: dict, config: dict) -> tuple[int | None, str]:
    """The most tokens a graph holds (a decoder's prompt + generation, an encoder's input) and where that comes
    from: the fused writer's metadata (export.max_length), else config.json's position table, less RoBERTa's
    padding offset (the rule of compress.models.max_tokens, which this self-contained file cannot import)."""
    if meta.get("compress.max_length"):
        return int(meta["compress.max_length"]), "export.max_length"
    key = next((k for k in ("max_position_embeddings", "n_positions", "max_seq_len") if config.get(k)), None)
    if key is None:
        return None, "no position table in config.json"
    limit = int(config[key])
    if config.get("model_type") in OFFSET_POSITIONS:
        pad = config.get("pad_token_id")
        limit -= (1 if pad is None else int(pad)) + 1
    return limit, f"{key} in config.json"


def _regular(folder: Path, name: str) -> Path | None:
    """`folder / name` if it is a regular file inside `folder`, None if there is nothing there; ValueError for a
    folder, pipe or device (reading a pipe waits forever) or a link out of the folder (compress.checkpoint's
    rule, which this self-contained file cannot import)."""
    path = folder / name
    try:
        mode = os.stat(path).st_mode  # follows links: what open() would read
    except FileNotFoundError:
        return None
    except OSError as exc:  # e.g. a listed "config.json/x", config.json being no folder
        raise ValueError(f"{path} cannot be read ({exc.strerror}): the checkpoint is damaged; copy it again") from None
    if not path.resolve().is_relative_to(folder.resolve()):
        raise ValueError(f"{path} is a link to {path.resolve()}, outside the checkpoint's folder: copy the checkpoint "
                         "again (with cp -L or rsync -L)")
    if not stat.S_ISREG(mode):
        raise ValueError(f"{path} is not a regular file (a folder, pipe or device): the checkpoint is damaged; copy it "
                         "again")
    return path


def _read_json(folder: Path, name: str) -> dict:
    """The JSON object in `folder / name` ({} when there is no such file); ValueError naming the file when it
    holds none or is no regular file inside the folder."""
    path = _regular(folder, name)
    if path is None:
        return {}
    try:
        data = json.loads(path.read_text())
    except (ValueError, RecursionError) as exc:  # bad JSON, bad UTF-8, or nested too deeply to parse
        raise ValueError(f"{path} is not valid JSON ({exc}): damaged; copy the checkpoint again") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds a JSON {type(data).__name__}, not an object: damaged; copy the checkpoint "
                         "again")
    return data


_READS = ("model.onnx", "model.onnx.data", "config.json", "generation_config.json", "tokenizer.json",
          "tokenizer_config.json")  # what the runner opens besides manifest.json


def _verify_files(folder: Path, manifest: dict, model_file: str = "model.onnx") -> None:
    """ValueError unless the manifest lists files and every one is there with its size and sha256 (what
    compress.checkpoint.verify checks of them), the graph `model_file` among them."""
    import hashlib

    files = manifest.get("files")
    if not (folder / "manifest.json").exists():
        raise ValueError(f"{folder / 'manifest.json'} not found, so the files cannot be checked: give an exported "
                         "checkpoint's folder, or skip the check (--no-verify)")
    if not files or not isinstance(files, dict) or not all(isinstance(m, dict) for m in files.values()):
        raise ValueError(f"{folder / 'manifest.json'} has no table of files to check: damaged; copy the checkpoint "
                         "again, or skip the check (--no-verify)")
    held = {k: manifest.get(k) for k in ("kind", "task", "dtype", "structure", "quantization", "files")}
    content = hashlib.sha256(json.dumps(held, sort_keys=True, default=str).encode()).hexdigest()[:20]
    if manifest.get("content") != content:  # compress.checkpoint.content_hash's rule
        raise ValueError(f"{folder / 'manifest.json'}: " + (
            "it has no content hash (written before 2026-12-07, or the field was removed), so its task and file "
            "table cannot be trusted; export it again, or skip the check (--no-verify)" if "content" not in manifest
            else "its kind, task, dtype, structure, quantization or file table was changed after the checkpoint "
                 "was written (its content hash differs); copy the checkpoint again"))
    for name in (*_READS, model_file):  # a file the runner reads must be one the checkpoint was written with
        if name not in files and (folder / name).exists():
            raise ValueError(f"{folder / name} is not in manifest.json's table of files, and the runner reads it: "
                             "added after the checkpoint was written; remove it, or copy the checkpoint again")
    for name, meta in files.items():
        # compress.checkpoint's rule: a plain relative path inside the folder
        if not name or Path(name).is_absolute() or ".." in Path(name).parts or "\\" in name or "\0" in name:
            raise ValueError(f"{folder / 'manifest.json'} lists {name!r}, which is not a plain relative path inside "
                             "the checkpoint's folder: edited; refusing to open it (copy the checkpoint again)")
        f = folder / name
        if f.is_symlink():
            raise ValueError(f"{f} is a link, where the checkpoint was written with a file: copy the checkpoint "
                             "again (with cp -L or rsync -L)")
        if not isinstance(meta.get("sha256"), str):
            raise ValueError(f"{folder / 'manifest.json'} lists {name} without a sha256 to check it against: damaged; "
                             "copy the checkpoint again, or skip the check (--no-verify)")
        if type(meta.get("size")) is not int:  # "678" printed as 678 read "is 678 bytes where ... says 678"
            raise ValueError(f"{folder / 'manifest.json'} lists {name} with size {meta.get('size')!r}, not a whole "
                             "number of bytes: damaged; copy the checkpoint again, or skip the check (--no-verify)")
        if _regular(folder, name) is None:
            raise ValueError(f"{f} is missing: the checkpoint is incomplete; copy it again")
        if f.stat().st_size != meta["size"]:
            raise ValueError(f"{f} is {f.stat().st_size} bytes where manifest.json says {meta['size']}: "
                             "truncated or changed; copy the checkpoint again")
        h = hashlib.sha256()
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
        if h.hexdigest() != meta["sha256"]:
            raise ValueError(f"{f} does not match its sha256 in manifest.json: changed or damaged; copy the "
                             "checkpoint again")


def _token_text(tok) -> str | None:
    return tok.get("content") if isinstance(tok, dict) else tok


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description="Run an exported compress checkpoint with ONNX Runtime only.")
    ap.add_argument("checkpoint", help="directory holding model.onnx, tokenizer.json, config.json")
    ap.add_argument("text", nargs="+", help="prompt(s) or text(s)")
    ap.add_argument("--max-new-tokens", type=int, default=32, help="decoders: tokens to generate (greedy decoding, "
                    "stopping at any end-of-text id of generation_config.json)")
    ap.add_argument("--threads", type=int, default=None, help="ONNX Runtime's intra-op threads (default: its "
                    "own choice); at most the machine's cores")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--classify", action="store_true")
    mode.add_argument("--embed", action="store_true")
    ap.add_argument("--no-verify", action="store_true", help="skip checking the files against manifest.json's "
                    "sizes and sha256 (a second or so for a 100 MB model)")
    args = ap.parse_args(argv)
    if args.max_new_tokens < 1:
        ap.error(f"--max-new-tokens must be at least 1 (got {args.max_new_tokens})")
    cores = os.cpu_count() or 1
    if args.threads is not None and not 1 <= args.threads <= cores:  # more only waste: ORT spins them all
        ap.error(f"--threads must be between 1 and this machine's {cores} cores (got {args.threads})")
    state = ort.capi.onnxruntime_pybind11_state  # ONNX Runtime's errors for a graph it cannot load
    ort_errors = tuple(getattr(state, n) for n in ("Fail", "InvalidProtobuf", "InvalidGraph", "NoSuchFile")
                       if hasattr(state, n))
    try:
        return _run(args)
    except (OSError, ValueError, *ort_errors) as exc:  # bad input: one line, not a traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _run(args) -> int:
    model = EdgeModel(args.checkpoint, threads=args.threads, verify=not args.no_verify)
    wanted = "sequence-classification" if args.classify else "feature-extraction" if args.embed else None
    if wanted and model.task != wanted:
        raise ValueError(f"--{'classify' if args.classify else 'embed'} needs a {wanted} model; "
                         f"{args.checkpoint} is {model.task}")
    if args.classify or model.task == "sequence-classification":
        for text, (label, p) in zip(args.text, model.classify(args.text)):
            print(json.dumps({"text": text, "label": label, "probability": round(p, 4)}))
    elif args.embed or model.task == "feature-extraction":
        for text, vec in zip(args.text, model.embed_texts(args.text)):
            print(json.dumps({"text": text, "embedding": [round(float(v), 6) for v in vec]}))
    else:
        for text in args.text:
            print(json.dumps({"prompt": text, "completion": model.generate_text(text, args.max_new_tokens)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
