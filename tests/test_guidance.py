"""Class conditioning and classifier-free guidance: the guided output at w = 0 / 1, the null class,
label dropout, parameter counts, conditional train → sample, and bad-input errors."""

import glob
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from configs import cifar10, cifar10_cond, digits_cond, mnist_cond
from ddpm_jax import chains, diffusion, generate, model_fns, modes, train_step, unet
from helpers import tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_CLASSES = 10
# Reference §1.9: the original CIFAR10 UNet.
CIFAR10_PARAMS = 35_746_307


def conditional_config():
    config = tiny_config()
    config.model.num_classes = NUM_CLASSES
    config.sample.guidance_scale = 3.0
    return config


@pytest.fixture(scope="module")
def perturbed_model():
    """A tiny conditional model whose outputs depend visibly on the label (the initial conv_out
    is ~1e-10, so the raw init predicts ~0 whatever the class)."""
    config = conditional_config()
    graphdef, params = model_fns.init_params(config)
    rng = np.random.default_rng(0)
    params = jax.tree.map(
        lambda p: jnp.asarray(p + 0.05 * rng.standard_normal(p.shape), jnp.float32), params)
    x = jnp.asarray(rng.standard_normal((4, 8, 8, 1)), jnp.float32)
    t = jnp.asarray([0, 5, 10, 19], jnp.int32)
    y = jnp.asarray([0, 3, 7, 9], jnp.int32)
    return config, graphdef, params, x, t, y


def test_guidance_scale_0_and_1_are_the_unconditional_and_conditional_predictions(perturbed_model):
    config, graphdef, params, x, t, y = perturbed_model
    model = model_fns.merge(graphdef, params)
    null = jnp.full_like(y, NUM_CLASSES)
    # The same batched call the guided function makes: [x; x] with labels [y; null].
    both = model(jnp.concatenate([x, x]), jnp.concatenate([t, t]), jnp.concatenate([y, null]))
    cond, uncond = both[:4], both[4:]
    assert float(jnp.abs(cond - uncond).max()) > 0.05  # the label matters, so w can be told apart

    guided = {w: model_fns.guided_model_fn(graphdef, params, y, w)(x, t) for w in (0.0, 1.0, 3.0)}
    np.testing.assert_array_equal(guided[0.0], uncond)
    np.testing.assert_array_equal(guided[1.0], cond)
    np.testing.assert_allclose(guided[3.0], uncond + 3.0 * (cond - uncond), rtol=1e-5, atol=1e-5)

    # Against separate batch-B calls: XLA (oneDNN) picks other convolution kernels for batch 4
    # than for batch 8, so these agree to float32 rounding (observed ≤ 2e-6), not bit for bit.
    separate_uncond = model_fns.model_fn(graphdef, params, None)(x, t)
    separate_cond = model_fns.model_fn(graphdef, params, y)(x, t)
    np.testing.assert_allclose(guided[0.0], separate_uncond, atol=1e-5, rtol=0)
    np.testing.assert_allclose(guided[1.0], separate_cond, atol=1e-5, rtol=0)


def test_guide_mixes_only_the_mean_channels():
    rng = np.random.default_rng(1)
    cond = jnp.asarray(rng.standard_normal((2, 4, 4, 6)), jnp.float32)
    uncond = jnp.asarray(rng.standard_normal((2, 4, 4, 6)), jnp.float32)
    out = np.asarray(model_fns.guide(cond, uncond, 2.5, channels=3))
    np.testing.assert_allclose(out[..., :3], 2.5 * cond[..., :3] - 1.5 * uncond[..., :3],
                               rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(out[..., 3:], cond[..., 3:])  # learned variance: conditional


def test_both_samplers_take_the_guided_model(perturbed_model):
    """w = 1 guided sampling follows the plain conditional chain (to float32 rounding, since the
    batch-2B and batch-B convolutions round differently); w = 3 leaves it."""
    config, graphdef, params, x, _, y = perturbed_model
    schedule = diffusion.schedule_from_config(config.diffusion)
    key = jax.random.key(3)
    timesteps = chains.ddim_timesteps(config.diffusion.num_timesteps, 5)

    def run(denoise, method):
        if method == "ddim":
            return chains.ddim_sample(denoise, schedule, x, key, timesteps=timesteps)
        return chains.ancestral_sample(denoise, schedule, x, key, mean_type="eps",
                                         var_type="fixedlarge")

    for method in ("ddim", "ancestral"):
        plain = run(model_fns.model_fn(graphdef, params, y), method)
        guided1 = run(model_fns.guided_model_fn(graphdef, params, y, 1.0), method)
        guided3 = run(model_fns.guided_model_fn(graphdef, params, y, 3.0), method)
        np.testing.assert_allclose(guided1, plain, atol=1e-4, rtol=0)
        assert float(jnp.abs(guided3 - plain).max()) > 1e-2


def test_null_class_is_never_a_real_label(perturbed_model):
    assert unet.null_class(NUM_CLASSES) == NUM_CLASSES  # row num_classes (docs/deviations.md D15)
    # The unconditional prediction (w = 0, the null label) is that of no real class.
    config, graphdef, params, x, t, _ = perturbed_model
    uncond = model_fns.guided_model_fn(graphdef, params, jnp.zeros_like(t), 0.0)(x, t)
    for label in range(NUM_CLASSES):
        cond = model_fns.model_fn(graphdef, params, jnp.full_like(t, label))(x, t)
        assert float(jnp.abs(cond - uncond).max()) > 1e-2, label
    labels = jnp.asarray(np.arange(4096) % NUM_CLASSES, jnp.int32)
    dropped = np.asarray(train_step.drop_labels(jax.random.key(0), jnp.int32(0), labels,
                                                NUM_CLASSES, 0.5))
    kept = dropped != NUM_CLASSES
    np.testing.assert_array_equal(dropped[kept], np.asarray(labels)[kept])  # real labels intact
    assert set(np.unique(dropped)) <= set(range(NUM_CLASSES + 1))
    # The embedding has one row per real class plus the null row.
    _, params = model_fns.abstract_params(conditional_config())
    assert params["class_embed"]["embedding"].shape[0] == NUM_CLASSES + 1


def test_label_dropout_rate_matches_probability():
    """Binomial(N, p): the observed rate lies within 5 standard deviations of p."""
    n, p = 40_000, 0.1
    labels = jnp.zeros((n,), jnp.int32)
    dropped = train_step.drop_labels(jax.random.key(7), jnp.int32(0), labels, NUM_CLASSES, p)
    rate = float(jnp.mean(dropped == NUM_CLASSES))
    assert abs(rate - p) < 5 * math.sqrt(p * (1 - p) / n)
    # Keyed by the global example index: the same example gets the same decision in any batch.
    part = train_step.drop_labels(jax.random.key(7), jnp.int32(1000), labels[:500], NUM_CLASSES, p)
    np.testing.assert_array_equal(part, dropped[1000:1500])


def test_conditional_param_count_adds_one_embedding_row_per_class_plus_null():
    _, uncond = model_fns.abstract_params(cifar10.get_config())
    _, cond = model_fns.abstract_params(cifar10_cond.get_config())
    temb_ch = 4 * cifar10.get_config().model.ch
    count = lambda tree: sum(math.prod(x.shape) for x in jax.tree.leaves(tree))
    assert count(uncond) == CIFAR10_PARAMS
    assert count(cond) == CIFAR10_PARAMS + (NUM_CLASSES + 1) * temb_ch
    assert "class_embed" not in uncond
    # The unconditional model still maps onto the original TF names one to one.
    model = jax.eval_shape(lambda: model_fns.create_model(cifar10.get_config()))
    names = unet.tf_variable_names(model)
    assert len(names) == 328 and "model/temb/dense0/W" in names


def test_cond_configs():
    """Each `_cond` config is its unconditional config plus the class settings, with the guidance
    scale and label dropout its docstring states."""
    import re

    from configs import digits, mnist

    def flat(tree, prefix=""):
        if not isinstance(tree, dict):
            return {prefix[:-1]: tree}
        return {k: v for key, value in tree.items() for k, v in flat(value, f"{prefix}{key}.").items()}

    for module, base in ((mnist_cond, mnist), (cifar10_cond, cifar10), (digits_cond, digits)):
        config = module.get_config()
        doc = " ".join(module.__doc__.split())
        assert re.findall(r"w = (\d+)", doc) == [f"{config.sample.guidance_scale:g}"], doc
        assert re.search(r"(label dropout|p =) 0\.1\b", doc) and config.model.class_dropout == 0.1
        assert config.model.num_classes == 10
        ours, theirs = flat(config.to_dict()), flat(base.get_config().to_dict())
        changed = {key for key in ours.keys() | theirs.keys() if ours.get(key) != theirs.get(key)}
        assert changed == {"model.num_classes", "sample.guidance_scale"}  # class_dropout: default 0.1


def test_dataset_class_count_must_match():
    config = conditional_config()
    with pytest.raises(ValueError, match="num_classes=10 but the dataset has 2 classes"):
        train_step.check_dataset_labels(config.model, 2, np.array([0, 1]))
    with pytest.raises(ValueError, match="outside"):
        train_step.check_dataset_labels(config.model, 10, np.array([0, 10]))
    train_step.check_dataset_labels(config.model, 10, np.arange(10))  # fine
    config.model.num_classes = 0
    train_step.check_dataset_labels(config.model, 2, np.array([0, 5]))  # unconditional: ignored


def test_conditional_train_then_sample_one_row_per_class(tmp_path):
    config = conditional_config()
    config.training.num_steps = 1
    config.training.checkpoint_every = 1
    config.sample.num_samples = 20
    config.sample.batch_size = 16
    config.sample.progress_every = 0
    workdir = str(tmp_path / "run")
    modes.run_mode("train", config, workdir)
    modes.run_mode("sample", config, workdir)
    (out_dir,) = glob.glob(os.path.join(workdir, "samples", "ancestral_step00000001_seed0_w3_*"))
    saved = np.load(os.path.join(out_dir, "samples.npz"))
    assert saved["images"].shape == (20, 8, 8, 1)
    np.testing.assert_array_equal(saved["labels"], np.repeat(np.arange(10), 2))
    # 10 rows of 2 images of 8 px with 2 px padding, enlarged x3 to reach 256 px.
    grid = Image.open(os.path.join(out_dir, "grid.png"))
    rows, columns = 10, 2
    height, width = rows * 10 + 2, columns * 10 + 2
    factor = math.ceil(256 / height)
    assert grid.size == (width * factor, height * factor)


def _assert_one_line_error_and_nothing_written(config, workdir, match):
    before = sorted(os.listdir(workdir))
    with pytest.raises(ValueError, match=match) as error:
        modes.run_mode("sample", config, str(workdir))
    assert "\n" not in str(error.value)
    assert sorted(os.listdir(workdir)) == before


def test_guidance_or_labels_on_an_unconditional_model_is_one_error(tmp_path):
    config = tiny_config()
    config.sample.guidance_scale = 3.0
    _assert_one_line_error_and_nothing_written(config, tmp_path, "needs a class-conditional model")
    config.sample.guidance_scale = 0.0
    config.sample.labels = "3"
    _assert_one_line_error_and_nothing_written(config, tmp_path, "needs a class-conditional model")
    with pytest.raises(ValueError, match="class-conditional"):
        model_fns.guided_model_fn(*model_fns.abstract_params(config), jnp.zeros(2, jnp.int32), 3.0)


def test_label_outside_the_classes_is_one_error(tmp_path):
    config = conditional_config()
    for labels in ("3,10", "-1"):
        config.sample.labels = labels
        _assert_one_line_error_and_nothing_written(config, tmp_path, "outside the model's classes")
    config.sample.labels = "3"
    with pytest.raises(ValueError, match="labels must lie in"):
        next(generate.batches(None, None, config, None, 2, jax.random.key(0),
                               labels=np.array([3, 12])))


def test_cli_prints_one_error_line_and_writes_nothing(tmp_path):
    workdir = tmp_path / "run"
    workdir.mkdir()
    result = subprocess.run(
        [sys.executable, "-m", "ddpm_jax.main", "--mode=sample", "--config",
         os.path.join(REPO, "configs", "digits.py"), f"--workdir={workdir}",
         "--config.sample.guidance_scale=3", "--config.sample.batch_size=16"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
        env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "sample.guidance_scale=3.0 needs a class-conditional model" \
        in errors[0]
    assert os.listdir(workdir) == []
