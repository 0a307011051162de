"""The data-parallel train step: `jax.shard_map` over the `data` mesh inside `jax.jit`.

Each device takes its slice of the global batch and computes its loss; `gradients.py` turns it
into the step's gradient (clipped per group of examples, averaged over all devices), and every
device applies the same Adam update and EMA to its replicated copy of the state.

Randomness is never carried in the state: the step's key is `fold_in(seed_key, step)`, and the
timestep, noise and flip of each example are drawn from `fold_in(step_key, global example
index)`, so they do not depend on how many devices share the batch; dropout draws from
`fold_in(step_key, −1 − clipping group index)`. A resumed run therefore continues exactly.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax import lax
from jax.sharding import Mesh, PartitionSpec as P

from ddpm_jax import diffusion, gradients, model_fns, optim, unet
from ddpm_jax import images as images_lib
from ddpm_jax.parallel import DATA_AXIS, replicated

NUM_QUARTILES = 4
# A fixed fold_in constant for the label-dropout decision, so that it is independent of the
# (t, noise, flip) keys split from the same example key and leaves them unchanged.
LABEL_DROPOUT_STREAM = 0x6C61626C


def ema_decay_at(step: jax.Array, decay: float, warmup: bool) -> jax.Array | float:
    """The EMA decay of the update after `step` updates.

    With `warmup` it is `min(decay, (1 + step) / (10 + step))` (the `num_updates` form of
    `tf.train.ExponentialMovingAverage`), so that a short run's shadow forgets the initial
    weights: after N updates its share of them is prod_t (1 + t)/(10 + t) ≈ 9!/N^9 instead of
    decay^N. Without it (the paper) the decay is constant from step 0.
    """
    if not warmup:
        return decay
    step = jnp.asarray(step, jnp.float32)
    return jnp.minimum(jnp.float32(decay), (1.0 + step) / (10.0 + step))


class TrainState(NamedTuple):
    step: jax.Array  # int32 scalar: optimizer updates done so far
    params: model_fns.Params
    ema_params: model_fns.Params
    opt_state: optax.OptState
    nonfinite_streak: jax.Array  # int32 scalar: consecutive skipped non-finite updates


def init_train_state(config, graphdef: nnx.GraphDef, params: model_fns.Params) -> TrainState:
    """Step 0: the EMA shadow starts at the initial weights (docs/original.md §3.4)."""
    optimizer = optim.make_optimizer(config.training)
    return TrainState(
        step=jnp.zeros([], jnp.int32),
        params=params,
        ema_params=jax.tree.map(jnp.copy, params),
        opt_state=optimizer.init(params),
        nonfinite_streak=jnp.zeros([], jnp.int32),
    )


def create_train_state(config, mesh: Mesh) -> tuple[nnx.GraphDef, TrainState]:
    """Initialises the state directly on the devices, replicated over the mesh."""
    graphdef, _ = model_fns.abstract_params(config)

    def init():
        _, params = model_fns.init_params(config)
        return init_train_state(config, graphdef, params)

    state = jax.jit(init, out_shardings=replicated(mesh))()
    return graphdef, state


def abstract_train_state(config) -> tuple[nnx.GraphDef, TrainState]:
    """Shapes and dtypes of the train state, e.g. as an Orbax restore target."""
    graphdef, _ = model_fns.abstract_params(config)

    def init():
        _, params = model_fns.init_params(config)
        return init_train_state(config, graphdef, params)

    return graphdef, jax.eval_shape(init)


def per_example_randomness(step_key: jax.Array, first_index: jax.Array, batch: int,
                           image_shape: tuple[int, ...], num_timesteps: int
                           ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """t ~ U{0..T−1}, ε ~ N(0, I) and a flip bit for each example, keyed by its global index."""

    def one(index):
        t_key, noise_key, flip_key = jax.random.split(jax.random.fold_in(step_key, index), 3)
        t = jax.random.randint(t_key, [], 0, num_timesteps, dtype=jnp.int32)
        noise = jax.random.normal(noise_key, image_shape, jnp.float32)
        flip = jax.random.bernoulli(flip_key, 0.5)
        return t, noise, flip

    return jax.vmap(one)(first_index + jnp.arange(batch))


def drop_labels(step_key: jax.Array, first_index: jax.Array, labels: jax.Array,
                num_classes: int, class_dropout: float) -> jax.Array:
    """Each label becomes the null class `num_classes` with probability `class_dropout`
    (Bernoulli per example, keyed by the example's global index), else stays as it is."""

    def dropped(index):
        key = jax.random.fold_in(jax.random.fold_in(step_key, index), LABEL_DROPOUT_STREAM)
        return jax.random.bernoulli(key, class_dropout)

    drop = jax.vmap(dropped)(first_index + jnp.arange(labels.shape[0]))
    return jnp.where(drop, unet.null_class(num_classes), labels.astype(jnp.int32))


def check_dataset_labels(model_config, dataset_num_classes: int, labels=None) -> None:
    """A conditional model needs the dataset's classes: same count, labels in [0, num_classes).

    Raises a one-line ValueError naming the fix otherwise; unconditional models ignore labels.
    """
    num_classes = model_config.num_classes
    if not unet.is_conditional(num_classes):
        return
    if dataset_num_classes != num_classes:
        raise ValueError(
            f"model.num_classes={num_classes} but the dataset has {dataset_num_classes} classes; "
            f"set --config.model.num_classes={dataset_num_classes} (or 0 for an unconditional model).")
    if labels is not None and len(labels):
        import numpy as np

        low, high = int(np.min(labels)), int(np.max(labels))
        if low < 0 or high >= num_classes:
            raise ValueError(
                f"dataset labels span [{low}, {high}], outside [0, {num_classes}) for "
                f"model.num_classes={num_classes}; fix the labels or set model.num_classes.")


def random_flip(images: jax.Array, flip: jax.Array) -> jax.Array:
    """Mirrors the images whose flip bit is set (`tf.image.random_flip_left_right`)."""
    return jnp.where(flip[:, None, None, None], images[:, :, ::-1, :], images)


def make_loss_fn(graphdef: nnx.GraphDef, config) -> Callable:
    """(params, x_start, labels, t, noise, dropout_key) → (mean loss, per-example losses)."""
    schedule = diffusion.schedule_from_config(config.diffusion)
    dc = config.diffusion
    conditional = unet.is_conditional(config.model.num_classes)

    def loss_fn(params, x_start, labels, t, noise, dropout_key):
        x_t = diffusion.q_sample(schedule, x_start, t, noise)
        model = model_fns.merge(graphdef, params)
        output = model(x_t, t, labels if conditional else None,
                       dropout_key=dropout_key if config.model.dropout > 0 else None)
        losses = diffusion.training_losses(
            schedule, output.astype(jnp.float32), x_start, x_t, t, noise,
            mean_type=dc.mean_type, var_type=dc.var_type, loss_type=dc.loss_type)
        return losses.mean(), losses

    return loss_fn


def _device_inputs(config, images: jax.Array, labels: jax.Array, step_key: jax.Array,
                   first_index: jax.Array) -> tuple[jax.Array, ...]:
    """(x_start, labels, t, noise) of this device's examples: scaled to [-1, 1], flipped, and
    for a conditional model with label dropout, some labels replaced by the null class."""
    num_classes = config.model.num_classes
    class_dropout = float(config.model.get("class_dropout", 0.0))  # validate.py checks the range
    t, noise, flip = per_example_randomness(
        step_key, first_index, images.shape[0], images.shape[1:], config.diffusion.num_timesteps)
    x_start = images_lib.to_model_range(images)
    if config.data.random_flip:
        x_start = random_flip(x_start, flip)
    if unet.is_conditional(num_classes) and class_dropout > 0:
        labels = drop_labels(step_key, first_index, labels, num_classes, class_dropout)
    return x_start, labels, t, noise


def _quartile_losses(losses: jax.Array, t: jax.Array, num_timesteps: int
                     ) -> tuple[jax.Array, jax.Array]:
    """Sums and counts of the losses over the mesh, per quarter of the timesteps."""
    quartile = t * NUM_QUARTILES // num_timesteps
    in_quartile = (quartile[:, None] == jnp.arange(NUM_QUARTILES)).astype(jnp.float32)
    return (lax.psum(jnp.sum(losses[:, None] * in_quartile, 0), DATA_AXIS),
            lax.psum(jnp.sum(in_quartile, 0), DATA_AXIS))


def make_device_step(graphdef: nnx.GraphDef, config) -> Callable:
    """One optimizer step as seen by one device of the mesh (call under `shard_map`)."""
    tc = config.training
    optimizer = optim.make_optimizer(tc)
    learning_rate = optim.warmup_learning_rate(tc.lr, tc.warmup_steps)
    loss_fn = make_loss_fn(graphdef, config)
    num_timesteps = config.diffusion.num_timesteps
    ema_warmup = bool(tc.get("ema_warmup", False))  # configs saved before the key: the paper's

    def device_step(state: TrainState, images: jax.Array, labels: jax.Array,
                    seed_key: jax.Array) -> tuple[TrainState, dict[str, jax.Array]]:
        device = lax.axis_index(DATA_AXIS)
        local_batch = images.shape[0]
        num_devices = lax.axis_size(DATA_AXIS)
        layout = gradients.group_layout(tc, local_batch * num_devices, num_devices)
        step_key = jax.random.fold_in(seed_key, state.step)
        x_start, labels, t, noise = _device_inputs(config, images, labels, step_key,
                                                   device * local_batch)

        # Differentiate w.r.t. a device-varying copy of the replicated params, so each device
        # gets its own gradient (shard_map would otherwise psum the gradient of an invariant).
        params = lax.pcast(state.params, DATA_AXIS, to="varying")
        grads, grad_norm, losses = gradients.clipped_mean_gradient(
            loss_fn, params, (x_start, labels, t, noise), step_key, layout=layout,
            grad_clip=tc.grad_clip, device=device, num_devices=num_devices)
        loss = lax.pmean(jnp.mean(losses), DATA_AXIS)

        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema_params = optim.ema_update(state.ema_params, params,
                                      ema_decay_at(state.step, tc.ema_decay, ema_warmup))

        # A non-finite loss or gradient anywhere skips the update on every device alike.
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
        new_state = TrainState(
            step=state.step + 1,
            params=keep(params, state.params),
            ema_params=keep(ema_params, state.ema_params),
            opt_state=keep(opt_state, state.opt_state),
            nonfinite_streak=jnp.where(finite, 0, state.nonfinite_streak + 1),
        )

        quartile_sums, quartile_counts = _quartile_losses(losses, t, num_timesteps)
        metrics = {
            "loss": loss,
            "grad_norm": grad_norm,
            "learning_rate": learning_rate(state.step),
            "skipped_nonfinite": 1.0 - finite.astype(jnp.float32),
            "quartile_loss_sum": quartile_sums,
            "quartile_count": quartile_counts,
        }
        return new_state, metrics

    return device_step


def make_train_step(graphdef: nnx.GraphDef, config, mesh: Mesh) -> Callable:
    """jit(shard_map(scan of `steps_per_call` device steps)); donates the state.

    Call as `state, metrics = step(state, images, labels, seed_key)` with uint8 images
    [K, B, H, W, C] and labels [K, B] sharded over `data` on axis 1; metrics are stacked [K].
    """
    device_step = make_device_step(graphdef, config)

    def device_steps(state, images, labels, seed_key):
        def body(state, batch):
            return device_step(state, batch[0], batch[1], seed_key)

        return lax.scan(body, state, (images, labels))

    sharded = jax.shard_map(
        device_steps, mesh=mesh,
        in_specs=(P(), P(None, DATA_AXIS), P(None, DATA_AXIS), P()),
        out_specs=(P(), P()))
    return jax.jit(sharded, donate_argnums=(0,))


def summarize_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """Host-side means over the K steps of one call; loss per timestep quartile."""
    import numpy as np

    metrics = jax.device_get(metrics)
    sums = np.sum(metrics["quartile_loss_sum"], axis=0)
    counts = np.sum(metrics["quartile_count"], axis=0)
    out = {
        "loss": float(np.mean(metrics["loss"])),
        "grad_norm": float(np.mean(metrics["grad_norm"])),
        "learning_rate": float(metrics["learning_rate"][-1]),
        "skipped_nonfinite": float(np.sum(metrics["skipped_nonfinite"])),
    }
    for q in range(NUM_QUARTILES):
        if counts[q] > 0:
            out[f"loss_q{q}"] = float(sums[q] / counts[q])
    return out
