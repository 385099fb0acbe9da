#!/usr/bin/env bash
# The GPU checks, as one command on a GPU machine (Python 3.12 with torch, transformers and peft; no ray,
# deepspeed or datasets; no network):
#   1. benchmarks/gpu_throughput.py: a ~1.1 B Llama built from config, LoRA through Ray Train + DeepSpeed ZeRO-0
#      bf16 ÷ a bare PyTorch + PEFT loop on the same GPU (tokens/s, MFU);
#   2. one ZeRO-3 bf16 trial of the same model through `python -m scaling_lab.study run`: tokens/s, MFU and peak
#      GPU memory, from the trial's row.
# What the machine lacks is installed from wheels in .whl/ at the repository's root, which
#   benchmarks/device_check.sh --download
# fills on a machine with network access (Python 3.12 manylinux x86-64 wheels; DeepSpeed, published as source only,
# is built into a pure-Python wheel, its ops compiled on first use; Ray's 79 MB wheel is repacked as .tar.xz
# without its Java jars, RLlib, Serve and LLM packages, to fit what a device call carries).
#
#   benchmarks/device_check.sh [--steps 30]      (PYTHON=python3 by default)
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
WHEELS="$ROOT/.whl"
SITE="${SITE:-/tmp/scaling_lab_site}"
STEPS=30
# What the H200 image lacks of ray[train,tune], deepspeed and datasets (the rest is there).
# The versions this project's environment runs with.
PURE="datasets==5.2.0 hjson==3.1.0 pydantic==2.14.4 annotated-types==0.8.0 typing-inspection==0.4.5
      jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0 tensorboardX==2.6.5 dill==0.4.1
      multiprocess==0.70.19"
BINARY="pydantic-core==2.50.5 rpds-py==2026.9.1"

download() {
  mkdir -p "$WHEELS"
  local platforms="--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64"
  # shellcheck disable=SC2086
  "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $platforms \
    -d "$WHEELS" $PURE $BINARY ray==2.60.0
  "$PYTHON" -m pip wheel -q --no-deps --no-build-isolation -w "$WHEELS" deepspeed==0.19.8
  local unpacked
  unpacked="$(mktemp -d)"
  (cd "$unpacked" && "$PYTHON" -m zipfile -e "$WHEELS"/ray-2.60.0-*.whl . &&
    tar --exclude=ray/jars --exclude=ray/rllib --exclude=ray/serve --exclude=ray/llm -cf - . | xz -6 \
      >"$WHEELS/ray-2.60.0-cp312.tar.xz")
  rm -rf "$unpacked" "$WHEELS"/ray-2.60.0-*.whl
  du -sh "$WHEELS"
}

install_missing() {
  if "$PYTHON" -c "import ray, deepspeed, datasets" 2>/dev/null; then
    return
  fi
  [ -d "$WHEELS" ] || { echo "error: ray, deepspeed or datasets is missing and there is no $WHEELS" >&2; exit 2; }
  mkdir -p "$SITE"
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
    "$WHEELS"/*.whl
  for archive in "$WHEELS"/*.tar.xz; do
    [ -e "$archive" ] && tar -xJf "$archive" -C "$SITE"
  done
  chmod -R u+x "$SITE"/ray/core/src/ray 2>/dev/null || true
}

main() {
  while [ $# -gt 0 ]; do
    case "$1" in
      --download) download; exit 0 ;;
      --steps) STEPS="$2"; shift 2 ;;
      *) echo "usage: $0 [--download | --steps N]" >&2; exit 2 ;;
    esac
  done
  install_missing
  export PYTHONPATH="$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
  "$PYTHON" -c "import torch; assert torch.cuda.is_available(), 'no GPU'; print(torch.cuda.get_device_name())"
  echo "== 1. throughput: Ray Train + DeepSpeed ZeRO-0 bf16 ÷ bare PyTorch + PEFT"
  "$PYTHON" "$ROOT/benchmarks/gpu_throughput.py" --steps "$STEPS"
  echo "== 2. one ZeRO-3 bf16 trial of a 1.1 B Llama built from config, through study run"
  "$PYTHON" "$ROOT/benchmarks/gpu_zero3_trial.py" --steps "$STEPS"
}

main "$@"
