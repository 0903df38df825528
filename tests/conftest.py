import os
import sys
from pathlib import Path

import pytest
import torch

# One torch thread per test worker: on 2 cores, oversubscription makes small ops ~1000x slower.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ["COMPRESS_PROGRESS"] = "0"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).parent))

from tiny_models import save_tiny, tiny_bert, tiny_gpt2, tiny_llama  # noqa: E402


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Every test starts on one thread, whatever an earlier test in the same worker set (the runner sets the
    config's `threads`): results that depend on the float summation order, such as a reload compared
    bit for bit with a subprocess on one thread, must not depend on which tests ran before."""
    torch.set_num_threads(1)
    yield


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    return save_tiny(tiny_llama(), tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory) -> Path:
    return save_tiny(tiny_gpt2(), tmp_path_factory.mktemp("tiny-gpt2"))


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> Path:
    return save_tiny(tiny_bert(), tmp_path_factory.mktemp("tiny-bert"))
