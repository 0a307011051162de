"""Our UNet vs the diffusers (PyTorch) UNet2DModel, an independent implementation of the same model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import UNet2DModel
from diffusers.models.embeddings import get_timestep_embedding
from flax import nnx

from ddpm_jax.convert import (check_diffusers_config, diffusers_name, diffusers_unet_config,
                              params_from_diffusers)
from ddpm_jax.unet import UNet, count_params, tf_variable_names, timestep_embedding

# The diffusers side is built by `convert.diffusers_unet_config`, which tests/test_convert.py
# checks against google/ddpm-cifar10-32's published config.
CIFAR10_OURS = dict(ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,), dropout=0.1, resolution=32)
# A small model of a different depth (3 levels, 1 block per level, attention at 8x8) to check
# that the mapping derives its indices.
SMALL_OURS = dict(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(8,), dropout=0.0, resolution=16)
# google/ddpm-celebahq-256.
CELEBAHQ_OURS = dict(ch=128, ch_mult=(1, 1, 2, 2, 4, 4), num_res_blocks=2, attn_resolutions=(16,), dropout=0.0, resolution=256)


def _diffusers_config(ours):
    return diffusers_unet_config(nnx.eval_shape(lambda: UNet(**ours, rngs=nnx.Rngs(0))))


CIFAR10_DIFFUSERS = _diffusers_config(CIFAR10_OURS)
SMALL_DIFFUSERS = _diffusers_config(SMALL_OURS)
CELEBAHQ_DIFFUSERS = _diffusers_config(CELEBAHQ_OURS)


def random_diffusers_unet(config, seed, std=0.05):
    """A diffusers UNet with every parameter ~ N(0, std^2), so that zero-init paths matter."""
    torch.manual_seed(seed)
    model = UNet2DModel(**config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, std)
    return model


def numpy_state_dict(model):
    return {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}


def ported(reference, ours_config):
    abstract = nnx.eval_shape(lambda: UNet(**ours_config, rngs=nnx.Rngs(0)))
    state = params_from_diffusers(numpy_state_dict(reference), abstract)
    return nnx.merge(nnx.graphdef(abstract), state)


def torch_forward(model, x_nhwc, t):
    with torch.no_grad():
        out = model(torch.from_numpy(x_nhwc).permute(0, 3, 1, 2), torch.from_numpy(t).long()).sample
    return out.permute(0, 2, 3, 1).numpy()


@nnx.jit
def _jitted_forward(model, x, t):
    return model(x, t)


def jax_forward(model, x_nhwc, t):
    with jax.default_matmul_precision("highest"):
        return np.asarray(_jitted_forward(model, jnp.asarray(x_nhwc), jnp.asarray(t, jnp.int32)))


def random_inputs(batch, size, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, size, size, 3)).astype(np.float32)
    t = rng.integers(0, 1000, (batch,)).astype(np.int32)
    return x, t


@pytest.fixture(scope="module")
def small_abstract():
    return nnx.eval_shape(lambda: UNet(**SMALL_OURS, rngs=nnx.Rngs(0)))


@pytest.fixture(scope="module")
def small_reference():
    return random_diffusers_unet(SMALL_DIFFUSERS, seed=1)


def test_cifar10_forward_matches_diffusers():
    reference = random_diffusers_unet(CIFAR10_DIFFUSERS, seed=0)
    assert sum(p.numel() for p in reference.parameters()) == 35_746_307
    ours = ported(reference, CIFAR10_OURS)
    check_diffusers_config(reference.config, ours)

    x, t = random_inputs(2, 32, seed=0)
    t[0] = 0  # include both ends of the schedule
    t[1] = 999
    expected = torch_forward(reference, x, t)
    got = jax_forward(ours, x, t)
    assert np.abs(expected).max() > 0.05  # the comparison is not between near-zero tensors
    assert np.abs(got - expected).max() <= 1e-4

    # Negative control: cos-first embedding gives a clearly different output, so 1e-4 discriminates.
    cos_first = UNet2DModel(**{**CIFAR10_DIFFUSERS, "flip_sin_to_cos": True}).eval()
    cos_first.load_state_dict(reference.state_dict())
    assert np.abs(got - torch_forward(cos_first, x, t)).max() > 1e-2


def test_small_three_level_forward_matches_diffusers(small_reference):
    ours = ported(small_reference, SMALL_OURS)
    check_diffusers_config(small_reference.config, ours)
    x, t = random_inputs(3, 16, seed=1)
    expected = torch_forward(small_reference, x, t)
    got = jax_forward(ours, x, t)
    assert np.abs(expected).max() > 0.05
    assert np.abs(got - expected).max() <= 1e-4


def test_timestep_embedding_matches_diffusers():
    t = np.array([0, 1, 10, 250, 999])
    expected = get_timestep_embedding(torch.from_numpy(t), 128, flip_sin_to_cos=False, downscale_freq_shift=1).numpy()
    got = np.asarray(timestep_embedding(jnp.asarray(t, jnp.int32), 128))
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


def test_celebahq256_names_and_shapes_map_one_to_one():
    # Meta tensors: shapes only, no 113M-parameter allocation.
    with torch.device("meta"):
        reference = UNet2DModel(**CELEBAHQ_DIFFUSERS)
    source_shapes = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    abstract = nnx.eval_shape(lambda: UNet(**CELEBAHQ_OURS, rngs=nnx.Rngs(0)))
    targets = dict(nnx.to_flat_state(nnx.state(abstract, nnx.Param)))
    assert sum(int(np.prod(s)) for s in source_shapes.values()) == count_params(abstract) == 113_673_219

    mapped = {}
    for tf_name, path in tf_variable_names(abstract).items():
        key = diffusers_name(tf_name, num_levels=6)
        assert key in source_shapes, (tf_name, key)
        mapped[key] = tf_name
        source, target = source_shapes[key], tuple(targets[path].shape)
        if len(source) == 4 and len(target) == 4:
            assert target == (source[2], source[3], source[1], source[0]), key  # OIHW -> HWIO
        elif len(target) == 2:
            assert target == (source[1], source[0]) and source[2:] in ((), (1, 1)), key
        else:
            assert target == source, key
    assert set(mapped) == set(source_shapes)  # every source tensor used exactly once
    assert mapped["up_blocks.1.attentions.2.to_out.0.weight"] == "model/up_4/attn_2/proj_out/W"
    assert mapped["down_blocks.4.attentions.0.to_q.weight"] == "model/down_4/attn_0/q/W"
    check_diffusers_config(reference.config, abstract)


def test_legacy_attention_names_are_accepted(small_reference, small_abstract):
    abstract = small_abstract
    current = numpy_state_dict(small_reference)
    legacy_names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    legacy = {}
    for key, value in current.items():
        for new, old in legacy_names.items():
            key = key.replace(f".{new}.", f".{old}.")
        legacy[key] = value
    assert any(".proj_attn." in k for k in legacy)
    a = jax.tree.leaves(params_from_diffusers(current, abstract))
    b = jax.tree.leaves(params_from_diffusers(legacy, abstract))
    assert len(a) == len(b) == len(current)
    for left, right in zip(a, b):
        np.testing.assert_array_equal(left, right)


def test_conversion_errors_name_the_variable(small_reference, small_abstract):
    abstract = small_abstract
    good = numpy_state_dict(small_reference)

    missing = dict(good)
    del missing["down_blocks.1.attentions.0.to_k.bias"]
    with pytest.raises(ValueError, match=r"down_blocks\.1\.attentions\.0\.to_k\.bias"):
        params_from_diffusers(missing, abstract)

    wrong_shape = dict(good)
    wrong_shape["mid_block.resnets.1.conv2.weight"] = np.zeros((64, 64, 1, 1), np.float32)
    with pytest.raises(ValueError, match=r"mid_block\.resnets\.1\.conv2\.weight"):
        params_from_diffusers(wrong_shape, abstract)

    transposed = dict(good)
    transposed["time_embedding.linear_1.weight"] = good["time_embedding.linear_1.weight"].T
    with pytest.raises(ValueError, match=r"time_embedding\.linear_1\.weight"):
        params_from_diffusers(transposed, abstract)

    unused = dict(good, **{"up_blocks.0.resnets.5.conv1.weight": np.zeros((1,), np.float32)})
    with pytest.raises(ValueError, match=r"up_blocks\.0\.resnets\.5\.conv1\.weight"):
        params_from_diffusers(unused, abstract)

    # A model with a different attention layout cannot silently absorb these weights.
    no_attention = nnx.eval_shape(lambda: UNet(**{**SMALL_OURS, "attn_resolutions": ()}, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match=r"attentions\.0"):
        params_from_diffusers(good, no_attention)


@pytest.mark.parametrize(
    "change",
    [
        {"flip_sin_to_cos": True},
        {"freq_shift": 0},
        {"downsample_padding": 1},
        {"norm_eps": 1e-5},
        {"attention_head_dim": 8},
        {"up_block_types": ["UpBlock2D", "UpBlock2D", "UpBlock2D"]},
        {"block_out_channels": [32, 64, 128]},
    ],
)
def test_config_check_rejects_other_architectures(small_abstract, change):
    abstract = small_abstract
    check_diffusers_config(SMALL_DIFFUSERS, abstract)
    with pytest.raises(ValueError, match=next(iter(change))):
        check_diffusers_config({**SMALL_DIFFUSERS, **change}, abstract)
