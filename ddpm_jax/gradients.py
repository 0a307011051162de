"""The gradient the optimizer sees: clipped per group of examples, then averaged.

`training.clip_mode` names the groups whose gradients are clipped one by one:

* `group`: runs of `training.clip_group_size` consecutive examples of the global batch. The
  paper configs use 16, which on the authors' TPU v3-8 (8 replicas of 16 images, docs/original.md
  §3.4) is exactly their per-replica clipping, and stays the same recipe on any device count;
* `per_device`: each device's shard, whatever its size (the original's semantics taken literally);
* `global`: the whole global batch, i.e. the averaged gradient is clipped.

A group's gradient is the gradient of its mean loss, clipped to `grad_clip` by its global norm
(`optim.clip_by_global_norm`); the optimizer gets the mean of the clipped group gradients. A
group either lies inside one device (a device then holds several, vmapped) or spans a block of
consecutive devices (their partial gradients are averaged across the block before clipping).

`training.microbatch_size` (per device; 0 = the whole shard) bounds memory: a device's shard is
processed in chunks scanned one after another, gradients accumulated, with the same result as
the unsplit step. Dropout is keyed per group, so results do not depend on the device count as
long as groups lie inside devices; a group split into microbatches or over devices draws one
dropout key per part.

On the CPU backend the groups of one model call are not vmapped but computed as separate,
unrolled parts (`parallel_parts`), which XLA:CPU runs side by side.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from ddpm_jax import optim
from ddpm_jax.parallel import DATA_AXIS

CLIP_MODES = ("group", "per_device", "global")


class GroupLayout(NamedTuple):
    """How one device's shard of `local` examples splits into clipping groups and model calls."""
    group_size: int  # examples per clipping group (global)
    devices_per_group: int  # 1 when a group lies inside one device
    groups_per_device: int  # local groups (1 when a group spans devices)
    groups_per_call: int  # groups vmapped together in one model call
    calls_per_group: int  # microbatches accumulated before a group's gradient is clipped
    examples_per_call: int  # examples of one group in one model call


def group_size(training_config, global_batch: int, num_devices: int) -> int:
    tc = training_config
    if tc.clip_mode == "group":
        return int(tc.clip_group_size)
    if tc.clip_mode == "per_device":
        return global_batch // num_devices
    return global_batch


def group_layout(training_config, global_batch: int, num_devices: int) -> GroupLayout:
    """The layout for this batch and device count, or a one-line ValueError naming the fix."""
    tc = training_config
    local = global_batch // num_devices
    size = group_size(tc, global_batch, num_devices)
    if size < 1 or global_batch % size:
        raise ValueError(
            f"training.clip_group_size={size} must divide training.batch_size={global_batch}; "
            "set --config.training.clip_group_size to a divisor of the batch (16 in the paper).")
    if local % size and size % local:
        raise ValueError(
            f"training.clip_group_size={size} neither fits a whole number of times in the "
            f"{local} examples per device nor spans whole devices; set "
            f"--config.training.clip_group_size to a divisor or a multiple of {local}.")
    devices_per_group = max(size // local, 1)
    if (1 < devices_per_group < num_devices
            and devices_per_group & (devices_per_group - 1)):
        raise ValueError(
            f"training.clip_group_size={size} spans {devices_per_group} devices, which must be a "
            "power of two; set --config.training.clip_group_size so that it does.")
    in_device = min(size, local)
    micro = int(tc.get("microbatch_size", 0)) or local
    if micro < 1 or local % micro or (micro % in_device and in_device % micro):
        raise ValueError(
            f"training.microbatch_size={micro} must divide the {local} examples per device and be "
            f"a divisor or a multiple of the {in_device} examples of a clipping group on a "
            "device; set --config.training.microbatch_size (0 = no microbatching).")
    per_call = min(micro, in_device)
    return GroupLayout(
        group_size=size,
        devices_per_group=devices_per_group,
        groups_per_device=local // in_device,
        groups_per_call=max(micro // in_device, 1),
        calls_per_group=in_device // per_call,
        examples_per_call=per_call,
    )


def block_mean(tree: Any, block: int, num_devices: int) -> Any:
    """The mean over each block of `block` consecutive devices of the `data` axis.

    Recursive doubling with `ppermute`: after step k every device holds the sum over its
    aligned block of 2^k devices; both partners add the same two values, so every device of a
    block ends with the same bits.
    """
    if block == num_devices:  # also for a single device: pmean makes the value invariant
        return lax.pmean(tree, DATA_AXIS)
    if block == 1:
        return tree
    distance = 1
    while distance < block:
        pairs = [(i, i ^ distance) for i in range(num_devices)]
        tree = jax.tree.map(lambda x, p=pairs: x + lax.ppermute(x, DATA_AXIS, p), tree)
        distance *= 2
    return jax.tree.map(lambda x: x / block, tree)


def _map_or_single(fn: Callable, xs: Any, length: int) -> Any:
    """vmap over the leading axis, or a plain call when it has length 1 (keeps the HLO of the
    common one-group case unchanged)."""
    if length == 1:
        return jax.tree.map(lambda y: y[None], fn(*jax.tree.map(lambda x: x[0], xs)))
    return jax.vmap(fn)(*xs)


# "auto": on the CPU backend one part per group, up to MAX_AUTO_PARTS; 1 elsewhere. Or an int.
PARALLEL_PARTS: Any = "auto"
MAX_AUTO_PARTS = 8


def parallel_parts(layout: GroupLayout) -> int:
    """Into how many independent, unrolled parts the vmapped groups of one model call split.

    Why: XLA:CPU runs each convolution or fusion of a device's program on about one thread, but
    runs independent ops side by side, and a group axis added by `vmap` makes every op of the
    model a batched one. One part per group gives it unbatched ops and independent work: the
    learner step (8 groups of 16 on one device) ran 1.44x faster, 1.15-1.24x with two devices
    (benchmarks/README.md, "fourth session"), at 1.2-2.2x the compile time; the CIFAR10
    model, whose ops are large, gains nothing. Each group keeps its examples and dropout key,
    so only the float summation order changes. TPU/GPU keep one vmapped call.
    """
    parts = PARALLEL_PARTS
    if parts == "auto":
        if jax.default_backend() != "cpu":
            return 1
        parts = MAX_AUTO_PARTS
    parts = min(int(parts), layout.groups_per_call)
    while layout.groups_per_call % parts:
        parts -= 1
    return parts if layout.devices_per_group == 1 else 1


def clipped_mean_gradient(loss_fn: Callable, params: Any, examples: tuple, step_key: jax.Array,
                          *, layout: GroupLayout, grad_clip: float, device: jax.Array,
                          num_devices: int) -> tuple[Any, jax.Array, jax.Array]:
    """(mean clipped group gradient, mean pre-clip group norm, per-example losses) on one device.

    `loss_fn(params, *examples_part, dropout_key) -> (mean loss, per-example losses)`;
    `examples` are this device's arrays with the local batch on axis 0. The returned gradient
    and norm are averaged over every group of the global batch (identical on all devices).
    """
    lay = layout
    local = jax.tree.leaves(examples)[0].shape[0]
    outer = lay.groups_per_device // lay.groups_per_call
    shape = (outer, lay.groups_per_call, lay.calls_per_group, lay.examples_per_call)
    parts = jax.tree.map(lambda x: x.reshape(shape + x.shape[1:]), examples)

    # Global index of this device's first group (or of the group its shard is part of).
    first_group = device * local // lay.group_size
    group_ids = first_group + jnp.arange(lay.groups_per_device).reshape(outer, lay.groups_per_call)

    def group_key(group_id):
        key = jax.random.fold_in(step_key, -1 - group_id)
        if lay.devices_per_group > 1:
            key = jax.random.fold_in(key, device % lay.devices_per_group)
        return key

    def raw_group_gradient(group_parts, group_id):
        key = group_key(group_id)

        def call(index, call_parts):
            dropout_key = key if lay.calls_per_group == 1 else jax.random.fold_in(key, index)
            (_, losses), grads = jax.value_and_grad(loss_fn, has_aux=True)(
                params, *call_parts, dropout_key)
            return grads, losses

        if lay.calls_per_group == 1:
            grads, losses = call(0, jax.tree.map(lambda x: x[0], group_parts))
            return grads, losses[None]

        def accumulate(total, indexed):
            grads, losses = call(*indexed)
            return jax.tree.map(jnp.add, total, grads), losses

        zeros = jax.tree.map(jnp.zeros_like, params)
        total, losses = lax.scan(accumulate, zeros, (jnp.arange(lay.calls_per_group), group_parts))
        return jax.tree.map(lambda g: g / lay.calls_per_group, total), losses

    def clipped_sum(group_examples, ids):
        count = ids.shape[0]
        raw, losses = _map_or_single(raw_group_gradient, (group_examples, ids), count)
        raw = block_mean(raw, lay.devices_per_group, num_devices)
        clipped, norms = _map_or_single(lambda g: optim.clip_by_global_norm(g, grad_clip), (raw,),
                                        count)
        return jax.tree.map(lambda g: jnp.sum(g, 0), clipped), jnp.sum(norms), losses

    splits = parallel_parts(lay)
    size = lay.groups_per_call // splits

    def clipped_groups(chunk_parts, chunk_ids):
        """The clipped gradients' sum, norms' sum and losses of one call's groups, in parts."""
        pieces = [clipped_sum(jax.tree.map(lambda x: x[i * size:(i + 1) * size], chunk_parts),
                              chunk_ids[i * size:(i + 1) * size]) for i in range(splits)]
        grads = jax.tree.map(lambda *g: sum(g[1:], g[0]), *(p[0] for p in pieces))
        norms = sum((p[1] for p in pieces[1:]), pieces[0][1])
        return grads, norms, jnp.concatenate([p[2] for p in pieces])

    if outer == 1:
        first = lambda x: x[0]
        grad_sum, norm_sum, losses = clipped_groups(jax.tree.map(first, parts), group_ids[0])
        losses = losses[None]
    else:
        def body(carry, chunk):
            grads, norms, losses = clipped_groups(*chunk)
            return (jax.tree.map(jnp.add, carry[0], grads), carry[1] + norms), losses

        zeros = (jax.tree.map(lambda p: jnp.zeros(p.shape, p.dtype), params),
                 jnp.zeros([], jnp.float32))
        if lay.devices_per_group < num_devices:  # the clipped sums differ between devices
            zeros = lax.pcast(zeros, DATA_AXIS, to="varying")
        (grad_sum, norm_sum), losses = lax.scan(body, zeros, (parts, group_ids))

    grads = jax.tree.map(lambda g: g / lay.groups_per_device, grad_sum)
    grad_norm = norm_sum / lay.groups_per_device
    if lay.devices_per_group < num_devices:  # else every device already holds the one group
        grads, grad_norm = lax.pmean((grads, grad_norm), DATA_AXIS)
    return grads, grad_norm, losses.reshape(local)
