"""The wheel ships the library, the pipelines and the benchmark harness, never the study scripts."""
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STUDIES = ["prune_lowrank", "quantize_compare", "harness_check", "distill_bbc", "distill_cache", "distill_common",
           "distill_layer_choice", "distill_report", "distill_smollm2", "ort_profile", "edge_clean_venv",
           "quantize-decode"]


def test_wheel_has_the_packages_and_no_studies(tmp_path):
    # Build from a copy, so that setuptools' build/ and *.egg-info never land in the checkout.
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".git", ".venv", "runs", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", "results"))
    env = dict(os.environ, PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path / "dist"), str(src)], check=True, env=env, capture_output=True, timeout=120)
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {"compress/__init__.py", "pipelines/__init__.py", "benchmarks/harness.py"} <= set(names)
    assert not [n for n in names if n.startswith("studies/")]
    assert not [n for n in names if any(s in Path(n).name for s in STUDIES)]
    top_level = [n for n in names if n.endswith(".dist-info/top_level.txt")]
    if top_level:
        assert "studies" not in zipfile.ZipFile(wheel).read(top_level[0]).decode().split()
