#!/usr/bin/env bash
# Ours against diffusers on one NVIDIA GPU, f32 and bf16: the CIFAR10 train step and the
# ancestral sampler, each timed interleaved with the PyTorch reference in one process.
# About 5 minutes on an H100/H200 (most of it compiling). Needs jax[cuda] and torch (CUDA) already
# installed; puts in what the JAX-only images lack (no TensorFlow: the benchmarks do not need it).
#
#   bash benchmarks/gpu.sh [OUT.jsonl]      # default: benchmarks/gpu_results.jsonl
#
# Each line of OUT is one JSON measurement (impl jax / torch / ratio); paste the ratios into
# benchmarks/README.md with the GPU's name (printed first).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-benchmarks/gpu_results.jsonl}"

python -c 'import jax, torch; assert jax.default_backend() == "gpu", jax.default_backend(); assert torch.cuda.is_available()' \
  || { echo "error: needs jax with CUDA and torch with CUDA on an NVIDIA GPU" >&2; exit 2; }
python -m pip install --quiet --no-deps -e .
python -m pip install --quiet ml-collections diffusers scikit-learn
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

: > "$out"
for dtype in float32 bfloat16; do
  # The paper's per-core batch (16) and a GPU-sized one (128, the paper's global batch).
  for batch in 16 128; do
    python benchmarks/train_throughput.py --platform cuda --config cifar10 \
      --set "model.dtype=$dtype" --per_device_batch "$batch" --steps_per_call 10 \
      --torch --reps 3 | grep '^{' | tee -a "$out"
  done
  # 20 denoising steps of the 1000-step ancestral chain, scaled to the whole chain.
  python benchmarks/sample_throughput.py --platform cuda --config cifar10 \
    --set "model.dtype=$dtype" --batch 256 --chain_steps 20 --methods ancestral \
    --torch --reps 3 | grep '^{' | tee -a "$out"
done
echo "wrote $out"
