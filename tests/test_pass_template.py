"""The pass template: `Pass.run` checks the input once and calls `apply`; typed hand-offs between passes."""
import pytest
from tiny_models import tiny_llama, tiny_tokenizer

from compress.checkpoint import Artifact
from compress.distill.config import DistillConfig, LossConfig, RecoverConfig, TrainConfig
from compress.errors import ConfigError, UnsupportedModelError
from compress.passes import Pass, PassConfig, PassContext, get


class _Counting(Pass):
    name = "counting"
    Config = PassConfig
    calls = 0

    def apply(self, model, ctx):
        type(self).calls += 1
        return model.derive()


def _torch_art(quantization=None):
    return Artifact(kind="torch", task="causal-lm", tokenizer=tiny_tokenizer(), model=tiny_llama(),
                    quantization=quantization)


def test_run_checks_kind_and_quantized_input_before_apply(tmp_path):
    p = _Counting()
    onnx_art = Artifact(kind="onnx", task="causal-lm", tokenizer=None, onnx_dir=tmp_path)
    with pytest.raises(UnsupportedModelError, match="counting needs a torch model, got onnx: move `counting` "
                                                    "before the export pass"):
        p.run(onnx_art, PassContext())
    with pytest.raises(UnsupportedModelError, match=r"already quantized \(bf16\)"):
        p.run(_torch_art({"method": "bf16"}), PassContext())
    assert _Counting.calls == 0
    assert p.run(_torch_art(), PassContext()).kind == "torch" and _Counting.calls == 1
    # export explains the fix for its own case
    with pytest.raises(UnsupportedModelError, match="quantize on the ONNX side"):
        get("export")().run(_torch_art({"method": "bf16"}), PassContext())


def test_context_hands_over_a_loaded_teacher():
    teacher = _torch_art()
    ctx = PassContext().with_teacher(teacher, name="unpruned")
    assert ctx.teacher() is teacher and ctx.source == "unpruned"
    assert PassContext(source="builtin:x").with_teacher(teacher).source == "builtin:x"  # name kept
    with pytest.raises(ConfigError, match="torch model"):
        PassContext().with_teacher(Artifact(kind="onnx", task="causal-lm", tokenizer=None))


def test_distill_option_groups_have_one_set_of_defaults():
    c = DistillConfig()
    assert isinstance(c, TrainConfig) and isinstance(c, LossConfig)
    for group in (TrainConfig, LossConfig):
        for name, field in group.model_fields.items():
            assert getattr(c, name) == field.get_default(call_default_factory=True), name
    assert c.lr == 1e-4  # the trainer reads this object, not a copy with its own defaults


def test_recover_is_a_typed_distill_config():
    prune = get("prune")(recover={"max_steps": 3, "temperature": 1.5})
    assert isinstance(prune.config.recover, RecoverConfig) and prune.config.recover.max_steps == 3
    with pytest.raises(ConfigError, match=r"prune\.recover\.max_step: unknown option 'max_step'; did you mean "
                                          "'max_steps'"):
        get("prune")(recover={"max_step": 3})
    with pytest.raises(ConfigError, match="recover.student"):
        get("prune")(recover={"student": {"keep_layers": 2}})


def test_passes_run_from_python_keep_their_files_in_one_folder_removed_at_exit(tmp_path):
    """PassContext() outside a pipeline: one temp folder per process, removed when the process exits (not by a
    forked child that exits before it)."""
    import os
    import subprocess
    import sys

    code = ("import os, sys\nfrom compress.passes import PassContext\n"
            "p = PassContext().scratch\nassert PassContext().scratch == p and p.is_dir()\n"
            "pid = os.fork()\nif pid == 0:\n    sys.exit(0)\nos.waitpid(pid, 0)\nassert p.is_dir()\nprint(p)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "TMPDIR": str(tmp_path)})
    assert out.returncode == 0, out.stderr[-2000:]
    folder = out.stdout.strip().splitlines()[-1]
    assert folder.startswith(str(tmp_path)) and not os.path.exists(folder)
