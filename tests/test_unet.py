"""Tests of ddpm_jax.unet against the reference numbers (docs/original.md §1) and closed forms."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ddpm_jax.unet import (
    UNet,
    count_params,
    inverted_dropout,
    param_summary,
    tf_variable_names,
    timestep_embedding,
    upsample_nearest_2x,
)

CIFAR10 = dict(ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,), dropout=0.1, resolution=32)
CELEBAHQ256 = dict(ch=128, ch_mult=(1, 1, 2, 2, 4, 4), num_res_blocks=2, attn_resolutions=(16,), dropout=0.0, resolution=256)
# Tiny config for anything that runs forward: levels at 16 and 8, attention at 8 and in the middle.
TINY = dict(ch=32, ch_mult=(1, 2), num_res_blocks=2, attn_resolutions=(8,), dropout=0.0, resolution=16)


def abstract_unet(**config):
    return nnx.eval_shape(lambda: UNet(**config, rngs=nnx.Rngs(0)))


def param_arrays(model) -> dict:
    """TF name -> numpy array."""
    state = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    return {name: np.asarray(state[path][...]) for name, path in tf_variable_names(model).items()}


def randomize_params(model, seed: int, std: float = 0.05) -> None:
    """Overwrite every parameter with N(0, std^2) so that the near-zero layers are exercised."""
    rng = np.random.default_rng(seed)
    state = nnx.state(model, nnx.Param)
    leaves, treedef = jax.tree.flatten(state)
    new = [jnp.asarray(std * rng.standard_normal(leaf.shape), jnp.float32) for leaf in leaves]
    nnx.update(model, jax.tree.unflatten(treedef, new))


@pytest.fixture(scope="module")
def tiny_model():
    """One freshly initialised TINY model per module; tests that mutate it work on `nnx.clone`."""
    return UNet(**TINY, rngs=nnx.Rngs(3))


@nnx.jit
def forward(model, x, t, dropout_key=None):
    return model(x, t, dropout_key=dropout_key)


def tiny_inputs(batch=2, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1, 1, (batch, 16, 16, 3)).astype(np.float32)
    t = rng.integers(0, 1000, (batch,)).astype(np.int32)
    return jnp.asarray(x), jnp.asarray(t)


# ---------------------------------------------------------------- parameter counts (§1.9)


@pytest.fixture(scope="module")
def cifar10_abstract():
    return abstract_unet(**CIFAR10)


def test_cifar10_parameter_count_and_tensor_count(cifar10_abstract):
    model = cifar10_abstract
    assert count_params(model) == 35_746_307
    assert len(tf_variable_names(model)) == 328
    assert len(jax.tree.leaves(nnx.state(model, nnx.Param))) == 328


def test_learned_variance_parameter_count():
    assert count_params(abstract_unet(**CIFAR10, out_ch=6)) == 35_749_766


def test_256_parameter_count():
    assert count_params(abstract_unet(**CELEBAHQ256)) == 113_673_219


def test_cifar10_per_scope_totals(cifar10_abstract):
    expected = [
        ("temb", 328_704),
        ("conv_in", 3_584),
        ("down_0", 870_272),
        ("down_1", 3_480_320),
        ("down_2", 3_215_104),
        ("down_3", 2_625_024),
        ("mid", 2_888_704),
        ("up_3", 6_692_608),
        ("up_2", 6_692_608),
        ("up_1", 7_155_712),
        ("up_0", 1_789_952),
        ("norm_out", 256),
        ("conv_out", 3_459),
    ]
    assert param_summary(cifar10_abstract) == expected


# ---------------------------------------------------------------- TF names and shapes (§1.7, §1.8)


def test_tf_variable_names_and_shapes(cifar10_abstract):
    model = cifar10_abstract
    names = tf_variable_names(model)
    state = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    shape = lambda name: tuple(state[names[name]].shape)  # noqa: E731

    assert names["model/down_1/block_0/nin_shortcut/W"] == ("down", 1, "block", 0, "nin_shortcut", "kernel")
    assert names["model/up_0/block_2/norm2/gamma"] == ("up", 0, "block", 2, "norm2", "scale")
    assert names["model/norm_out/beta"] == ("norm_out", "bias")
    expected_shapes = {
        "model/temb/dense0/W": (128, 512),
        "model/temb/dense1/W": (512, 512),
        "model/conv_in/W": (3, 3, 3, 128),
        "model/down_1/block_0/nin_shortcut/W": (128, 256),
        "model/down_1/attn_0/q/W": (256, 256),
        "model/down_1/attn_1/proj_out/b": (256,),
        "model/mid/attn_1/proj_out/b": (256,),
        "model/mid/block_2/conv2/W": (3, 3, 256, 256),
        "model/down_0/downsample/conv/W": (3, 3, 128, 128),
        "model/down_2/downsample/conv/W": (3, 3, 256, 256),
        "model/up_1/upsample/conv/W": (3, 3, 256, 256),
        "model/up_0/block_2/norm2/gamma": (128,),
        "model/norm_out/beta": (128,),
        "model/conv_out/W": (3, 3, 128, 3),
        # Up-path input channels, the table of docs/original.md §1.7 (h + skip).
        "model/up_3/block_0/norm1/gamma": (512,),
        "model/up_2/block_2/norm1/gamma": (512,),
        "model/up_1/block_1/norm1/gamma": (512,),
        "model/up_1/block_2/norm1/gamma": (384,),
        "model/up_0/block_0/norm1/gamma": (384,),
        "model/up_0/block_1/norm1/gamma": (256,),
        "model/up_0/block_2/conv1/W": (3, 3, 256, 128),
        "model/up_0/block_2/nin_shortcut/W": (256, 128),
    }
    for name, expected in expected_shapes.items():
        assert shape(name) == expected, name
    # Attention only at 16x16 (down_1 x2, up_1 x3) plus the middle; no resampling at the ends.
    attn_scopes = {"/".join(n.split("/")[1:3]) for n in names if "/attn_" in n}
    assert attn_scopes == {"down_1/attn_0", "down_1/attn_1", "mid/attn_1", "up_1/attn_0", "up_1/attn_1", "up_1/attn_2"}
    assert not any(n.startswith(("model/down_3/downsample", "model/up_0/upsample")) for n in names)
    # Identity shortcuts where in == out channels.
    assert "model/down_0/block_0/nin_shortcut/W" not in names
    assert "model/mid/block_1/nin_shortcut/W" not in names


# ---------------------------------------------------------------- primitives


def test_timestep_embedding_matches_closed_form():
    t = np.array([0, 1, 17, 500, 999])
    dim = 128
    half = dim // 2
    frequencies = np.exp(-np.log(10000.0) * np.arange(half) / (half - 1))  # f_0 = 1, f_63 = 1e-4
    angles = t[:, None].astype(np.float64) * frequencies[None, :]
    expected = np.concatenate([np.sin(angles), np.cos(angles)], axis=1)
    got = np.asarray(timestep_embedding(jnp.asarray(t, jnp.int32), dim))
    assert got.shape == (5, 128) and got.dtype == np.float32
    # float32 rounding of t*f (~1e-4 absolute at t=999) bounds the achievable agreement.
    np.testing.assert_allclose(got, expected, atol=3e-4, rtol=0)
    np.testing.assert_allclose(got[:, 0], np.sin(t), atol=3e-4)  # sin first, f_0 = 1
    np.testing.assert_allclose(got[:, 63], np.sin(t * 1e-4), atol=1e-6)  # f_63 = 1e-4 (divisor half-1)


def test_timestep_embedding_odd_dim_is_zero_padded():
    got = np.asarray(timestep_embedding(jnp.array([5, 7]), 9))
    frequencies = np.exp(-np.log(10000.0) * np.arange(4) / 3)
    angles = np.array([5.0, 7.0])[:, None] * frequencies
    np.testing.assert_allclose(got[:, :8], np.concatenate([np.sin(angles), np.cos(angles)], 1), atol=1e-5)
    np.testing.assert_array_equal(got[:, 8], 0.0)


def test_upsample_is_pixel_duplication():
    x = np.random.default_rng(0).standard_normal((2, 5, 7, 3)).astype(np.float32)
    rows, cols = np.arange(10) // 2, np.arange(14) // 2
    expected = x[:, rows][:, :, cols]
    np.testing.assert_array_equal(np.asarray(upsample_nearest_2x(jnp.asarray(x))), expected)


def test_inverted_dropout_statistics():
    x = jnp.ones((200_000,), jnp.float32)
    out = np.asarray(inverted_dropout(x, 0.1, jax.random.key(0)))
    dropped = out == 0
    assert abs(dropped.mean() - 0.1) < 0.005
    np.testing.assert_allclose(out[~dropped], 1 / 0.9, rtol=1e-6)


def test_group_norm_matches_two_pass_contiguous_groups(tiny_model):
    model = nnx.clone(tiny_model)
    norm = model.down[1].block[0].norm2  # 64 channels -> 32 groups of 2
    rng = np.random.default_rng(1)
    gamma = rng.standard_normal(64).astype(np.float32)
    beta = rng.standard_normal(64).astype(np.float32)
    norm.scale[...] = jnp.asarray(gamma)
    norm.bias[...] = jnp.asarray(beta)
    # Large mean and small spread: a one-pass E[x^2]-E[x]^2 variance would be destroyed in
    # float32, and var ~ 1e-6 makes eps=1e-6 (not 1e-5) visible.
    x = (30.0 + 1e-3 * rng.standard_normal((2, 4, 4, 64))).astype(np.float32)
    x[..., 1::2] += 1e-3  # differs across channels inside a contiguous group
    grouped = x.astype(np.float64).reshape(2, 4, 4, 32, 2)
    mean = grouped.mean(axis=(1, 2, 4), keepdims=True)
    var = ((grouped - mean) ** 2).mean(axis=(1, 2, 4), keepdims=True)
    expected = ((grouped - mean) / np.sqrt(var + 1e-6)).reshape(2, 4, 4, 64) * gamma + beta
    got = np.asarray(norm(jnp.asarray(x)))
    np.testing.assert_allclose(got, expected, atol=0.02)


def test_downsample_is_tf_same_padding_zero_one(tiny_model):
    model = nnx.clone(tiny_model)
    downsample = model.down[0].downsample
    downsample.bias[...] = jnp.linspace(-1, 1, 32)
    x = jnp.asarray(np.random.default_rng(2).standard_normal((2, 16, 16, 32)).astype(np.float32))
    kernel, bias = downsample.kernel[...], downsample.bias[...]

    def explicit(padding):
        return jax.lax.conv_general_dilated(
            x, kernel, (2, 2), padding, dimension_numbers=("NHWC", "HWIO", "NHWC"),
            precision=jax.lax.Precision.HIGHEST,
        ) + bias

    got = np.asarray(downsample(x))
    assert got.shape == (2, 8, 8, 32)
    np.testing.assert_allclose(got, np.asarray(explicit(((0, 1), (0, 1)))), atol=1e-5)
    # The symmetric padding PyTorch would use by default gives a different result.
    assert np.abs(got - np.asarray(explicit(((1, 1), (1, 1))))).max() > 1e-2


# ---------------------------------------------------------------- init (§1.2)


def uniform_limit(scale, fan_in, fan_out):
    return math.sqrt(3 * scale / ((fan_in + fan_out) / 2))


@pytest.mark.parametrize(
    "name, scale, fan_in, fan_out",
    [
        ("model/down_1/block_0/conv1/W", 1.0, 9 * 32, 9 * 64),
        ("model/up_0/block_0/conv1/W", 1.0, 9 * 96, 9 * 32),
        ("model/temb/dense0/W", 1.0, 32, 128),
        ("model/down_1/block_0/nin_shortcut/W", 1.0, 32, 64),
        ("model/down_1/attn_0/q/W", 1.0, 64, 64),
        ("model/down_1/block_0/conv2/W", 1e-10, 9 * 64, 9 * 64),
        ("model/mid/attn_1/proj_out/W", 1e-10, 64, 64),
        ("model/up_1/attn_2/proj_out/W", 1e-10, 64, 64),
        ("model/conv_out/W", 1e-10, 9 * 32, 9 * 3),
    ],
)
def test_init_is_fan_avg_uniform(tiny_model, name, scale, fan_in, fan_out):
    weights = param_arrays(tiny_model)[name]
    limit = uniform_limit(scale, fan_in, fan_out)
    assert np.abs(weights).max() <= limit * (1 + 1e-6)
    assert np.abs(weights).max() >= 0.95 * limit
    # U(-L, L) has std L / sqrt(3).
    assert abs(weights.std() / (limit / math.sqrt(3)) - 1) < 0.1
    assert abs(weights.mean()) < 0.1 * limit


def test_init_biases_and_norms(tiny_model):
    params = param_arrays(tiny_model)
    for name, value in params.items():
        if name.endswith(("/b", "/beta")):
            np.testing.assert_array_equal(value, 0.0, err_msg=name)
        elif name.endswith("/gamma"):
            np.testing.assert_array_equal(value, 1.0, err_msg=name)
    # docs/original.md §1.2: conv2 of a 256-channel block (CIFAR10's) gets L ≈ 3.6e-7; its 590k
    # weights come within 1e-5 of L, so their largest magnitude is that number to its 2 digits.
    from ddpm_jax.unet import ResnetBlock

    block = ResnetBlock(256, 256, 512, dropout=0.0, dtype=jnp.float32, rngs=nnx.Rngs(0))
    largest = float(jnp.abs(block.conv2.kernel[...]).max())
    assert abs(largest - 3.6e-7) < 0.05e-7, largest


# ---------------------------------------------------------------- forward pass


def test_untrained_output_is_near_zero(tiny_model):
    x, t = tiny_inputs()
    out = np.asarray(forward(tiny_model, x, t))
    assert out.shape == (2, 16, 16, 3) and out.dtype == np.float32
    # conv_out has scale 1e-10: L = sqrt(3e-10 / fan_avg) = 1.4e-6 here, and each output sums
    # 9*32 such weights times O(1) activations, so |out| ~ 1e-5 (not < 1e-6, even for CIFAR).
    assert np.abs(out).max() < 1e-4
    # Hence the code's initial L_simple loss of each example is the mean of its ε², up to the cross term
    # 2·mean(ε·out): |out| ~ 1e-5 averaged over 768 pixels of random sign, ~1e-6.
    from ddpm_jax import diffusion

    schedule = diffusion.make_schedule(np.linspace(1e-4, 0.02, 1000))
    eps = np.random.default_rng(9).standard_normal(x.shape).astype(np.float32)
    x_t = diffusion.q_sample(schedule, x, t, jnp.asarray(eps))
    losses = diffusion.training_losses(schedule, forward(tiny_model, x_t, t), x, x_t, t, jnp.asarray(eps),
                                       mean_type="eps", var_type="fixedlarge", loss_type="mse")
    np.testing.assert_allclose(losses, np.mean(eps.astype(np.float64) ** 2, axis=(1, 2, 3)), rtol=0, atol=1e-5)


def test_output_channels_and_input_checks():
    model = UNet(**{**TINY, "out_ch": 6}, rngs=nnx.Rngs(0))
    x, t = tiny_inputs()
    assert forward(model, x, t).shape == (2, 16, 16, 6)
    with pytest.raises(ValueError, match=r"expected input \[B, 16, 16, 3\], got \(2, 8, 8, 3\)"):
        model(jnp.zeros((2, 8, 8, 3)), t)
    with pytest.raises(NotImplementedError, match=r"this UNet is unconditional \(model.num_classes=0\)"):
        model(x, t, y=jnp.zeros((2,), jnp.int32))


def test_attention_block_matches_numpy(tiny_model):
    model = nnx.clone(tiny_model)
    randomize_params(model, seed=4, std=0.2)
    attn = model.mid.attn_1
    x = np.random.default_rng(5).standard_normal((2, 4, 4, 64)).astype(np.float32)
    p = {k: np.asarray(v[...], np.float64) for k, v in nnx.to_flat_state(nnx.state(attn, nnx.Param))}

    grouped = x.astype(np.float64).reshape(2, 4, 4, 32, 2)
    mean = grouped.mean(axis=(1, 2, 4), keepdims=True)
    var = grouped.var(axis=(1, 2, 4), keepdims=True)
    h = ((grouped - mean) / np.sqrt(var + 1e-6)).reshape(x.shape) * p[("norm", "scale")] + p[("norm", "bias")]
    q, k, v = (h @ p[(n, "kernel")] + p[(n, "bias")] for n in ("q", "k", "v"))
    w = np.einsum("bhwc,bHWc->bhwHW", q, k) * 64**-0.5
    w = w.reshape(2, 4, 4, 16)
    w = np.exp(w - w.max(-1, keepdims=True))
    w = (w / w.sum(-1, keepdims=True)).reshape(2, 4, 4, 4, 4)
    h = np.einsum("bhwHW,bHWc->bhwc", w, v)
    expected = x + h @ p[("proj_out", "kernel")] + p[("proj_out", "bias")]

    with jax.default_matmul_precision("highest"):
        got = np.asarray(attn(jnp.asarray(x)))
    np.testing.assert_allclose(got, expected, atol=1e-4)


def test_dropout_is_keyed_and_pure():
    model = UNet(**{**TINY, "dropout": 0.3}, rngs=nnx.Rngs(0))
    randomize_params(model, seed=6)
    x, t = tiny_inputs()
    key_a, key_b = jax.random.key(1), jax.random.key(2)

    no_key_1, no_key_2 = np.asarray(forward(model, x, t)), np.asarray(forward(model, x, t))
    with_a_1 = np.asarray(forward(model, x, t, key_a))
    with_a_2 = np.asarray(forward(model, x, t, key_a))
    with_b = np.asarray(forward(model, x, t, key_b))

    np.testing.assert_array_equal(no_key_1, no_key_2)
    np.testing.assert_array_equal(with_a_1, with_a_2)
    assert np.abs(with_a_1 - with_b).max() > 1e-3
    assert np.abs(with_a_1 - no_key_1).max() > 1e-3

    # Rate 0 with a key is the same function as no key.
    model_no_dropout = UNet(**TINY, rngs=nnx.Rngs(0))
    nnx.update(model_no_dropout, nnx.state(model, nnx.Param))
    np.testing.assert_allclose(np.asarray(forward(model_no_dropout, x, t, key_a)), no_key_1, atol=1e-6)


def test_dropout_is_only_inside_resblocks():
    # With rate 0.3 only the h branch of each resblock is perturbed: zeroing every conv2 removes
    # all dropout paths, so outputs must then be identical with and without a key.
    model = UNet(**{**TINY, "dropout": 0.3}, rngs=nnx.Rngs(0))
    randomize_params(model, seed=7)
    for level in (*model.down, *model.up):
        for block in level.block:
            block.conv2.kernel[...] = jnp.zeros_like(block.conv2.kernel[...])
    for block in (model.mid.block_1, model.mid.block_2):
        block.conv2.kernel[...] = jnp.zeros_like(block.conv2.kernel[...])
    x, t = tiny_inputs()
    np.testing.assert_allclose(
        np.asarray(forward(model, x, t, jax.random.key(3))), np.asarray(forward(model, x, t)), atol=1e-6
    )


def test_bfloat16_compute_keeps_float32_params_and_output(tiny_model):
    model32 = nnx.clone(tiny_model)
    randomize_params(model32, seed=8)
    model16 = UNet(**TINY, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    nnx.update(model16, nnx.state(model32, nnx.Param))
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(nnx.state(model16, nnx.Param)))
    x, t = tiny_inputs()
    out32, out16 = np.asarray(forward(model32, x, t)), np.asarray(forward(model16, x, t))
    assert out16.dtype == np.float32
    relative = np.linalg.norm(out16 - out32) / np.linalg.norm(out32)
    assert 0 < relative < 0.05
