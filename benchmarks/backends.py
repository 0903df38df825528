"""The backends, behind one interface: they only turn token ids into numpy outputs.

Each exposes EdgeModel's interface (compress/edge.py): `logits`, `embed`, `prefill`, `decode_step`,
`generate` (greedy, batch 1), plus `params` and `sync()`. The torch one is written here; the ORT one is
EdgeModel itself, so ONNX decoding has a single implementation in the suite; the llama.cpp one runs a peer's
GGUF files. Imported only inside the measuring subprocess (benchmarks/worker.py)."""
from __future__ import annotations

import inspect
from pathlib import Path

import numpy as np

from .latency import greedy
from .metrics import mean_pool
from .worker_spec import Backend


class TorchBackend:
    def __init__(self, target: str, loader: str, task: str, device: str, threads: int):
        import torch

        from compress.runtime import set_threads

        set_threads(threads)
        self.torch, self.task, self.device = torch, task, torch.device(device)
        if loader == "checkpoint":
            from compress.checkpoint import load

            model = load(target, verify_hashes=False).model  # the parent verified its files (resolve_target)
        else:
            from compress.models import load_model

            model, _ = load_model(target, task)
        from compress.models import count_parameters

        self.params = count_parameters(model)
        self.model = model.to(self.device).eval()
        self.dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        self.providers = None
        # The prefill computes the last position's logits only, as transformers' generate() asks for them.
        accepts = "logits_to_keep" in inspect.signature(model.forward).parameters
        self._last_only = {"logits_to_keep": 1} if accepts else {}

    def _t(self, a: np.ndarray):
        return self.torch.from_numpy(np.ascontiguousarray(a)).to(self.device)

    def _np(self, t) -> np.ndarray:
        return t.float().cpu().numpy()

    def sync(self) -> None:
        if self.device.type == "cuda":
            self.torch.cuda.synchronize()

    def logits(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        with self.torch.inference_mode():
            out = self.model(input_ids=self._t(input_ids), attention_mask=self._t(attention_mask))
        return self._np(out.logits)

    def embed(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        with self.torch.inference_mode():
            out = self.model(input_ids=self._t(input_ids), attention_mask=self._t(attention_mask))
        return mean_pool(self._np(out.last_hidden_state), attention_mask)

    def prefill(self, input_ids: np.ndarray, attention_mask: np.ndarray):
        mask = self._t(attention_mask)
        with self.torch.inference_mode():
            out = self.model(input_ids=self._t(input_ids), attention_mask=mask, use_cache=True, **self._last_only)
        return self._np(out.logits[:, -1]), {"past": out.past_key_values, "mask": mask}

    def decode_step(self, next_ids: np.ndarray, state: dict):
        torch = self.torch
        mask = torch.cat([state["mask"], torch.ones_like(state["mask"][:, :1])], dim=1)
        with torch.inference_mode():
            out = self.model(input_ids=self._t(next_ids), attention_mask=mask, past_key_values=state["past"],
                             use_cache=True)
        return self._np(out.logits[:, -1]), {"past": out.past_key_values, "mask": mask}

    def generate(self, prompt: np.ndarray, new_tokens: int, eos: int | None) -> list[int]:
        """Greedy continuation of `prompt` [1, P]: the decode loop latency timing runs."""
        return greedy(self, prompt, new_tokens, eos)[0].tolist()

    def cuda_peak_mb(self) -> float | None:
        if self.device.type != "cuda":
            return None
        return round(self.torch.cuda.max_memory_allocated() / 2**20, 1)


class OrtBackend:
    """compress.edge.EdgeModel on the CPU or CUDA execution provider."""

    def __init__(self, target: str, task: str, device: str, threads: int):
        from compress.edge import EdgeModel

        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda" else \
            ["CPUExecutionProvider"]
        self.model = EdgeModel(target, providers=providers, threads=threads, verify=False)  # the parent did
        self.task = task
        self.params = None  # counted from the graph by the parent
        self.dtype = None
        session = getattr(self.model, "session", None)
        self.providers = session.get_providers() if session is not None else providers

    def sync(self) -> None:  # ORT calls return when their outputs are on the host
        pass

    def logits(self, input_ids, attention_mask):
        return np.asarray(self.model.logits(input_ids, attention_mask), dtype=np.float32)

    def embed(self, input_ids, attention_mask):
        return np.asarray(self.model.embed(input_ids, attention_mask), dtype=np.float32)

    def prefill(self, input_ids, attention_mask):
        return self.model.prefill(input_ids, attention_mask)

    def decode_step(self, next_ids, state):
        return self.model.decode_step(next_ids, state)

    def generate(self, prompt: np.ndarray, new_tokens: int, eos: int | None) -> list[int]:
        """Greedy continuation of `prompt` [1, P] by EdgeModel.generate: the loop the edge bundle ships,
        on the same prefill / decode_step latency timing runs."""
        return self.model.generate(prompt, new_tokens, eos_token_id=eos)[0, prompt.shape[1]:].tolist()

    def cuda_peak_mb(self) -> float | None:
        return None


class LlamaCppBackend:
    """llama.cpp (llama-cpp-python) on a GGUF file: a peer, fed the same token ids and timed by the same greedy
    loop as the suite's backends. Timing and generation run as llama.cpp's own loop does, computing the last
    position's logits only; scoring reopens the model with logits for every position."""

    def __init__(self, target: str, threads: int, context: int):
        import llama_cpp

        self.lib = llama_cpp  # its C API, read every decode step
        self.target, self.threads, self.context = target, threads, context
        self.scoring = False  # opened for timing: the last position's logits only
        self.llm = self._open(logits_all=False)
        self.params = None  # counted from the file by the parent
        self.dtype = None
        self.providers = None

    def _open(self, logits_all: bool):
        return self.lib.Llama(model_path=self.target, n_ctx=self.context, n_batch=self.context, n_ubatch=self.context,
                     n_threads=self.threads, n_threads_batch=self.threads, logits_all=logits_all, verbose=False)

    def sync(self) -> None:
        pass

    def _last_logits(self) -> np.ndarray:
        ptr = self.lib.llama_get_logits_ith(self.llm.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self.llm.n_vocab(),)).copy()[None]

    def logits(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        if not self.scoring:  # the first scoring call: reopen with every position's logits
            self.llm.close()
            self.llm, self.scoring = self._open(logits_all=True), True
        if not attention_mask.all():
            raise ValueError("llamacpp-cpu scores unpadded sequences only")
        out = []
        for row in input_ids:  # one sequence at a time: batch 1, as llama.cpp runs
            self.llm.reset()
            self.llm.eval(row.tolist())
            out.append(np.array(self.llm.scores[: len(row)]))
        return np.stack(out)

    def embed(self, input_ids, attention_mask):
        raise ValueError("llamacpp-cpu measures causal LMs only")

    def prefill(self, input_ids: np.ndarray, attention_mask: np.ndarray):
        if input_ids.shape[0] != 1:
            raise ValueError("llamacpp-cpu times batch 1 only (latency.batch: 1)")
        self.llm.reset()
        self.llm.eval(input_ids[0].tolist())
        return self._last_logits(), None

    def decode_step(self, next_ids: np.ndarray, state):
        self.llm.eval([int(next_ids[0, 0])])
        return self._last_logits(), None

    generate = TorchBackend.generate  # the same greedy loop over prefill / decode_step

    def cuda_peak_mb(self) -> float | None:
        return None


def open_backend(target: str, loader: str, task: str, backend: Backend, threads: int, context: int):
    """The backend of one measurement; `context`: the longest sequence it will be fed (llama.cpp sizes its
    KV cache by it; the others grow theirs as needed)."""
    if backend.runtime == "torch":
        return TorchBackend(target, loader, task, backend.device, threads)
    if backend.runtime == "llamacpp":
        return LlamaCppBackend(target, threads, context)
    return OrtBackend(str(Path(target)), task, backend.device, threads)
