#!/usr/bin/env bash
# The GPU comparison as one prepared run (about 5-8 minutes on one H200): resnet50 at
# batch 256, train step and inference, JAX bf16/fp32 vs PyTorch AMP + channels_last (images/s,
# ratios, compile time, device memory), written as a markdown table to
# ${OUT:-.}/gpu_benchmark.md, then the training loop end to end (benchmarks/bench_train.py,
# BENCH_TRAIN_ARGS overrides its arguments). Run from the repository root on a machine whose python3 (or
# $PYTHON) has jax (with its CUDA plugin), flax, optax, torch and torchvision:
#   bash benchmarks/gpu_benchmark.sh
# Extra arguments go to bench_models.py and override these (a small dry run on CPU:
#   bash benchmarks/gpu_benchmark.sh --archs resnet18 --batch-sizes 2 --image-size 64 --rounds 1)
set -euo pipefail
out="${OUT:-.}/gpu_benchmark.md"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# JAX and torch share the GPU in one process: leave torch room beside JAX's memory pool.
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.5}"
{
  echo "## GPU, $(date -u +%Y-%m-%d)"
  echo
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null |
    sed 's/^/GPU: /' || echo "GPU: none found (nvidia-smi failed)"
  echo
} >"$out"
"${PYTHON:-python3}" benchmarks/bench_models.py --archs resnet50 --batch-sizes 256 --modes train,infer \
  --impls torch,jax-Conv --dtypes bf16,fp32 --rounds 3 --steps 10 --output "$out" "$@"
# The training script's loop end to end (tf.data JPEG pipeline included) against the bare step.
train_args="${BENCH_TRAIN_ARGS:---arch resnet50 --batch-size 256 --image-size 224 --steps 60 --log-every 20}"
{
  echo
  echo "\`python benchmarks/bench_train.py $train_args\`"
  echo
  # shellcheck disable=SC2086  # the arguments are meant to split
  "${PYTHON:-python3}" benchmarks/bench_train.py $train_args | tail -n 1
} >>"$out"
echo "wrote $out"
