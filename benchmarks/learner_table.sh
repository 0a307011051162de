#!/usr/bin/env bash
# The learner table of issue 14: ours against diffusers, interleaved, one process per row.
# Extra arguments go to every row, e.g. `--baseline gradients.PARALLEL_PARTS=1` to time the
# step from before the parallel parts as well.
#     bash benchmarks/learner_table.sh [--baseline module.ATTR=VALUE] | grep '^{'
set -euo pipefail
cd "$(dirname "$0")/.."
learner=(--config imagefolder --set data.channels=1 --set model.ch=32 --set "model.ch_mult=(1,2,2)"
         --set model.num_res_blocks=1 --set model.dropout=0.0)
row() {
  echo "== $1 | $(uptime)" >&2
  shift
  python benchmarks/train_throughput.py "$@" --torch
}
row "28 px, attention at 7x7, 2 x 64" "${learner[@]}" --set data.image_size=28 \
    --set "model.attn_resolutions=(7,)" --devices 2 --per_device_batch 64 --reps 5 "$@"
row "32 px, attention at 8x8, 2 x 64" "${learner[@]}" --set data.image_size=32 \
    --set "model.attn_resolutions=(8,)" --devices 2 --per_device_batch 64 --reps 5 "$@"
row "28 px, no attention, 2 x 64" "${learner[@]}" --set data.image_size=28 \
    --set "model.attn_resolutions=()" --devices 2 --per_device_batch 64 --reps 5 "$@"
row "28 px, attention at 7x7, 1 x 128" "${learner[@]}" --set data.image_size=28 \
    --set "model.attn_resolutions=(7,)" --devices 1 --per_device_batch 128 --reps 5 "$@"
row "digits config, 2 x 32" --config digits --devices 2 --per_device_batch 32 \
    --steps_per_call 50 --reps 3 "$@"
row "CIFAR10 config, 2 x 8" --config cifar10 --devices 2 --per_device_batch 8 \
    --steps_per_call 1 --reps 3 "$@"
