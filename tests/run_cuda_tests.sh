#!/usr/bin/env bash
# Run the GPU tests (tests/test_cuda.py) on a CUDA machine that already has a CUDA build of torch.
# With a folder of wheels as the first argument (the suite's pinned transformers, optimum, torch-pruning,
# bitsandbytes, ... for a machine with no package index), they are installed into a private folder that
# shadows the machine's own versions for this run only. Usage: bash tests/run_cuda_tests.sh [WHEELS_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${1:-}" ]; then
    site="$(mktemp -d)"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" "$1"/*.whl
    export PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, bitsandbytes; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'available', torch.cuda.is_available(), '| transformers', transformers.__version__, '| bitsandbytes', bitsandbytes.__version__)"
python3 -m pytest -p no:cacheprovider -q -rs tests/test_cuda.py "${@:2}"
