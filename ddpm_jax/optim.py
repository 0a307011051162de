"""The original's optimiser (docs/original.md §3.4): TF1 Adam, linear warmup, clipping and EMA."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax


def warmup_learning_rate(lr: float, warmup_steps: int) -> optax.Schedule:
    """lr_k = lr · min(k / warmup, 1), k the update count from 0 (the first update uses lr = 0)."""
    if warmup_steps <= 0:
        return optax.constant_schedule(lr)

    def schedule(count):
        # As TF computes it (optax's linear_schedule loses ~3e-4 relative early in warmup).
        return lr * jnp.minimum(jnp.asarray(count, jnp.float32) / warmup_steps, 1.0)

    return schedule


class TFAdamState(NamedTuple):
    count: jax.Array
    mu: Any
    nu: Any


def scale_by_tf_adam(b1: float, b2: float, eps: float) -> optax.GradientTransformation:
    """TF1 `AdamOptimizer`'s direction: √(1−β2^t)/(1−β1^t) · m_t / (√v_t + ε̂).

    Differs from optax's m̂/(√v̂ + ε) only in where ε enters (ε̂ = ε·√(1−β2^t) there).
    """

    def init(params):
        zeros = jax.tree.map(jnp.zeros_like, params)
        return TFAdamState(jnp.zeros([], jnp.int32), zeros, jax.tree.map(jnp.zeros_like, params))

    def update(updates, state, params=None):
        del params
        count = state.count + 1
        mu = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, state.mu, updates)
        nu = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * g * g, state.nu, updates)
        step_size = jnp.sqrt(1 - b2 ** count.astype(jnp.float32)) / (
            1 - b1 ** count.astype(jnp.float32))
        direction = jax.tree.map(lambda m, v: step_size * m / (jnp.sqrt(v) + eps), mu, nu)
        return direction, TFAdamState(count, mu, nu)

    return optax.GradientTransformation(init, update)


# `training.adam_eps_style`: TF1's ε̂ form (the original) or optax's ε.
ADAM_EPS_STYLES = ("tf", "optax")


def make_optimizer(training_config) -> optax.GradientTransformation:
    """Adam with the warmup schedule; clipping happens before, in the train step."""
    tc = training_config
    if tc.adam_eps_style == "tf":
        direction = scale_by_tf_adam(tc.adam_b1, tc.adam_b2, tc.adam_eps)
    elif tc.adam_eps_style == "optax":
        direction = optax.scale_by_adam(tc.adam_b1, tc.adam_b2, tc.adam_eps)
    else:
        raise ValueError(f"training.adam_eps_style={tc.adam_eps_style!r} is unknown; "
                         f"use one of {', '.join(ADAM_EPS_STYLES)}.")
    return optax.chain(direction,
                       optax.scale_by_learning_rate(warmup_learning_rate(tc.lr, tc.warmup_steps)))


def global_norm(tree: Any) -> jax.Array:
    """‖g‖ = sqrt(Σ_leaves Σ g²), in float32."""
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


def clip_by_global_norm(grads: Any, max_norm: float) -> tuple[Any, jax.Array]:
    """g · min(1, max_norm/‖g‖) (`tf.clip_by_global_norm`); also returns ‖g‖."""
    norm = global_norm(grads)
    scale = jnp.minimum(1.0, max_norm / jnp.maximum(norm, 1e-30))
    return jax.tree.map(lambda g: g * scale.astype(g.dtype), grads), norm


def ema_update(ema_params: Any, params: Any, decay: float) -> Any:
    """shadow ← shadow − (1 − decay)(shadow − var), `tf.train.ExponentialMovingAverage`."""
    return jax.tree.map(lambda e, p: e - (1.0 - decay) * (e - p), ema_params, params)
