"""Configs state the paper's recipes (docs/original.md §3.1, §3.4, §7), and `--mode=info` reports the
reference's parameter counts."""

import importlib
import subprocess
import sys
import os

import pytest

from ddpm_jax import info, modes

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(name):
    return importlib.import_module(f"configs.{name}").get_config()


def test_cifar10_is_the_papers_recipe():
    c = _config("cifar10")
    assert (c.data.name, c.data.image_size, c.data.channels, c.data.random_flip) == (
        "cifar10", 32, 3, True)
    assert (c.model.ch, tuple(c.model.ch_mult), c.model.num_res_blocks,
            tuple(c.model.attn_resolutions), c.model.dropout) == (128, (1, 2, 2, 2), 2, (16,), 0.1)
    assert c.model.num_classes == 0 and c.model.dtype == "float32"
    d = c.diffusion
    assert (d.num_timesteps, d.beta_schedule, d.beta_start, d.beta_end) == (1000, "linear", 1e-4, 0.02)
    assert (d.mean_type, d.var_type, d.loss_type) == ("eps", "fixedlarge", "mse")
    t = c.training
    assert (t.batch_size, t.lr, t.warmup_steps, t.num_steps) == (128, 2e-4, 5000, 800_000)
    assert (t.adam_b1, t.adam_b2, t.adam_eps, t.adam_eps_style) == (0.9, 0.999, 1e-8, "tf")
    assert (t.grad_clip, t.clip_mode, t.clip_group_size, t.ema_decay) == (1.0, "group", 16, 0.9999)
    assert c.eval.num_samples == 50_000


@pytest.mark.parametrize("name, steps, flip", [
    ("celebahq256", 500_000, True), ("lsun_bedroom", 2_400_000, False),
    ("lsun_church", 1_200_000, True), ("lsun_cat", 1_800_000, False)])
def test_256px_configs(name, steps, flip):
    c = _config(name)
    assert (c.data.image_size, tuple(c.model.ch_mult), c.model.dropout) == (256, (1, 1, 2, 2, 4, 4), 0.0)
    assert (c.training.lr, c.training.batch_size, c.diffusion.var_type) == (2e-5, 64, "fixedsmall")
    assert (c.training.num_steps, c.data.random_flip) == (steps, flip)
    assert info.model_info(c, flops=False)["num_params"] == 113_673_219


@pytest.mark.parametrize("name", ["default", "cifar10", "digits", "imagefolder", "mnist", "fashion_mnist", "celebahq256", "lsun_bedroom",
                                  "lsun_church", "lsun_cat"])
def test_every_config_builds_its_model(name):
    c = _config(name)
    out = info.model_info(c, flops=False)
    assert out["num_params"] > 0 and len(out["scopes"]) == 2 * len(c.model.ch_mult) + 5


def test_info_mode_prints_counts_and_flops():
    result = subprocess.run(
        [sys.executable, "-m", "ddpm_jax.main", "--config", "configs/cifar10.py", "--mode=info"],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "parameters: 35,746,307 in 328 tensors" in result.stdout
    assert "up_1           7,155,712  (16x16, 256 ch)" in result.stdout
    flops_line = [line for line in result.stdout.splitlines() if "FLOPs per image" in line][0]
    gflops = float(flops_line.split(":")[1].split()[0])
    # ~35.7M params at mostly 16x16/32x32 resolution: 2 FLOPs per MAC, ~6 GMAC per image.
    assert 8 < gflops < 16


def test_unknown_mode_is_a_one_line_error():
    result = subprocess.run(
        [sys.executable, "-m", "ddpm_jax.main", "--config", "configs/digits.py", "--mode=paint"],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "error: --mode='paint' is unknown; use one of train, sample, eval, info.")


def test_bad_model_shape_is_a_clear_error():
    c = _config("digits")
    c.data.image_size = 6  # three levels need a size divisible by 4
    c.model.ch_mult = (1, 2, 2)
    with pytest.raises(ValueError, match="data.image_size=6 cannot be halved"):
        modes.run_mode("info", c, None)


@pytest.mark.parametrize("cores,expected", [(1, None), (2, 2), (3, 2), (6, 4), (96, 4)])
def test_cpu_runs_get_one_device_per_core_that_batches_divide(cores, expected):
    from ddpm_jax import cli

    flags = cli.cpu_device_flags("--xla_cpu_enable_fast_math=false", cores)
    assert flags.startswith("--xla_cpu_enable_fast_math=false")
    if expected is None:
        assert "device_count" not in flags
    else:
        assert flags.endswith(f"--xla_force_host_platform_device_count={expected}")
        for batch in (64, 100, 128, 256):  # the configs' train/sample batch sizes
            assert batch % expected == 0


def test_cpu_device_count_set_by_the_user_is_kept():
    from ddpm_jax import cli

    flags = "--xla_force_host_platform_device_count=8"
    assert cli.cpu_device_flags(flags, 2) == flags
