#!/usr/bin/env bash
# Proves an exported bundle runs on a device with only onnxruntime, numpy and tokenizers: builds a fresh
# virtual environment with those three packages (no torch, no transformers, no compress) and runs the
# bundle's own edge_runner.py. Writes the transcript to benchmarks/results/quantize/edge_clean_venv.txt.
#
#   bash studies/edge_clean_venv.sh [BUNDLE_DIR] ["prompt"]
#
# Without BUNDLE_DIR it exports builtin:smollm2-135m with the suite (under the shared heavy-job lock) into
# /tmp/compress-edge-bundle first.
set -euo pipefail
cd "$(dirname "$0")/.."
BUNDLE="${1:-/tmp/compress-edge-bundle}"
PROMPT="${2:-The capital of France is}"
VENV="${EDGE_VENV:-/tmp/compress-edge-venv}"
OUT=benchmarks/results/quantize/edge_clean_venv.txt

if [ ! -f "$BUNDLE/model.onnx" ]; then
  echo "exporting builtin:smollm2-135m into $BUNDLE (suite venv, under /tmp/compress-heavy.lock)"
  flock /tmp/compress-heavy.lock .venv/bin/python - "$BUNDLE" <<'EOF'
import sys
from compress import save
from compress.checkpoint import Artifact
from compress.models import load_model
from compress.passes import PassContext, get
from compress.runtime import set_threads
set_threads(2)
model, tok = load_model("builtin:smollm2-135m", "causal-lm")
art = Artifact(kind="torch", task="causal-lm", tokenizer=tok, model=model)
out = get("export")().run(art, PassContext(task="causal-lm", scratch=__import__("pathlib").Path("/tmp")))
save(out, sys.argv[1], **{"pass": {"name": "export"}})
EOF
fi

rm -rf "$VENV"
python3 -m venv "$VENV"
start=$(date +%s)
"$VENV/bin/pip" install -q --disable-pip-version-check onnxruntime==1.31.1 numpy==2.4.6 tokenizers==0.22.2
{
  echo "# edge bundle in a clean venv ($(date -u +%FT%TZ))"
  echo "bundle: $BUNDLE"
  echo "pip install took $(( $(date +%s) - start )) s; installed packages:"
  "$VENV/bin/pip" list --disable-pip-version-check --format=freeze
  echo "torch importable: $("$VENV/bin/python" -c 'import importlib.util as u; print(u.find_spec("torch") is not None)')"
  echo "transformers importable: $("$VENV/bin/python" -c 'import importlib.util as u; print(u.find_spec("transformers") is not None)')"
  echo "\$ python edge_runner.py $BUNDLE \"$PROMPT\" --max-new-tokens 24 --threads 2"
  ( cd /tmp && /usr/bin/time -f "wall %e s, max RSS %M KB" "$VENV/bin/python" "$BUNDLE/edge_runner.py" "$BUNDLE" "$PROMPT" --max-new-tokens 24 --threads 2 ) 2>&1
} | tee "$OUT"
