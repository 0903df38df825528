"""`import compress.edge` (and the measuring worker's modules) load no torch: compress/__init__.py is lazy."""
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent

# Installs a meta-path finder that refuses the packages in BLOCKED; the test's code runs after it.
BLOCKER = textwrap.dedent("""
    import sys

    class Blocker:
        def __init__(self, names):
            self.names = set(names)

        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in self.names:
                raise ImportError(f"blocked import of {name}")
            return None

    sys.meta_path.insert(0, Blocker(BLOCKED))
""")


def run_blocked(code: str, *args, blocked=("torch", "transformers")) -> subprocess.CompletedProcess:
    script = f"BLOCKED = {list(blocked)!r}\n" + BLOCKER + textwrap.dedent(code)
    proc = subprocess.run([sys.executable, "-c", script, *map(str, args)], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def tiny_classifier(path: Path) -> np.ndarray:
    """An ONNX "classifier" made with onnx alone: logits = mean over tokens of an embedding table [10, 3]."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    table = np.arange(30, dtype=np.float32).reshape(10, 3) / 7
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "input_ids"], ["embedded"]),
         helper.make_node("ReduceMean", ["embedded"], ["logits"], axes=[1], keepdims=0)],
        "tiny", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "tokens"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3])],
        [numpy_helper.from_array(table, "table")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    path.mkdir()
    onnx.save(model, str(path / "model.onnx"))
    (path / "manifest.json").write_text(json.dumps({"task": "sequence-classification"}))
    (path / "config.json").write_text(json.dumps({"id2label": {"0": "a", "1": "b", "2": "c"}}))
    return table


def test_edge_runs_without_torch_or_transformers(tmp_path):
    table = tiny_classifier(tmp_path / "tiny")
    proc = run_blocked("""
        import json
        import numpy as np
        from compress.edge import EdgeModel

        model = EdgeModel(sys.argv[1], verify=False)  # a hand-made folder: its manifest lists no files
        logits = model.logits(np.array([[1, 2, 3], [4, 4, 9]]))
        assert "torch" not in sys.modules and "transformers" not in sys.modules
        print(json.dumps(logits.tolist()))
    """, tmp_path / "tiny")
    ids = np.array([[1, 2, 3], [4, 4, 9]])
    np.testing.assert_allclose(json.loads(proc.stdout), table[ids].mean(1), rtol=1e-6)


def test_package_and_errors_import_without_torch():
    run_blocked("""
        import compress
        from compress import CompressError, CompressInputError
        from compress.errors import ConfigError

        assert issubclass(ConfigError, CompressInputError) and issubclass(CompressInputError, CompressError)
        assert compress.__version__ and "torch" not in sys.modules
    """)


def test_worker_modules_import_light():
    """The measuring subprocess's own modules: an ORT measurement must not pay for torch or pydantic."""
    run_blocked("""
        import benchmarks.worker, benchmarks.backends
        from benchmarks.worker_spec import WorkerSpec
    """, blocked=("torch", "transformers", "pydantic", "compress"))


def test_lazy_names_resolve():
    import compress
    from compress.passes import PassContext, get

    assert compress.__all__ == ["Artifact", "CompressError", "CompressInputError", "load", "passes", "save"]
    from compress.checkpoint import Artifact, load, save

    assert (compress.load, compress.save, compress.Artifact) == (load, save, Artifact)
    assert compress.passes.get is get and compress.passes.PassContext is PassContext
    from compress import CompressInputError, errors

    assert compress.CompressInputError is CompressInputError is errors.CompressInputError
    assert set(compress.__all__) <= set(dir(compress))
    with pytest.raises(AttributeError, match="no_such_name"):
        compress.no_such_name
