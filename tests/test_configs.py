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


def _same_padding_taps(size, stride, kernel):
    """Σ over the outputs of one spatial axis of the kernel taps that fall inside the input (TF's
    SAME padding: pad_lo = ⌊total/2⌋), i.e. the multiply-adds XLA counts for a padded conv."""
    out = -(-size // stride)
    low = max((out - 1) * stride + kernel - size, 0) // 2
    return sum(0 <= o * stride - low + j < size for o in range(out) for j in range(kernel))


def _architecture_counts(config):
    """(parameters, forward multiply-adds per image) of the original UNet (docs/original.md §1),
    walked block by block from the config: convs, dense layers and the attention products."""
    m = config.model
    temb, size = 4 * m.ch, config.data.image_size
    out_ch = config.data.channels * (2 if config.diffusion.var_type.startswith("learned") else 1)
    count = {"params": 0, "macs": 0}

    def conv(res, cin, cout, k=3, stride=1):  # 1x1 convs are the original's dense `nin`s
        count["params"] += k * k * cin * cout + cout
        count["macs"] += _same_padding_taps(res, stride, k) ** 2 * cin * cout

    def dense(cin, cout):
        count["params"] += cin * cout + cout
        count["macs"] += cin * cout

    def norm(c):
        count["params"] += 2 * c

    def resnet_block(res, cin, cout):
        norm(cin)
        conv(res, cin, cout)
        dense(temb, cout)
        norm(cout)
        conv(res, cout, cout)
        if cin != cout:
            conv(res, cin, cout, k=1)

    def attention(res, c):
        norm(c)
        for _ in ("q", "k", "v", "proj_out"):
            conv(res, c, c, k=1)
        count["macs"] += 2 * (res * res) ** 2 * c  # q·kᵀ and weights·v

    dense(m.ch, temb)
    dense(temb, temb)
    if m.num_classes > 1:
        count["params"] += (m.num_classes + 1) * temb
    res, c = size, m.ch
    conv(res, config.data.channels, c)
    skips = [c]
    for level, mult in enumerate(m.ch_mult):
        for _ in range(m.num_res_blocks):
            resnet_block(res, c, m.ch * mult)
            c = m.ch * mult
            if res in m.attn_resolutions:
                attention(res, c)
            skips.append(c)
        if level < len(m.ch_mult) - 1:
            conv(res, c, c, stride=2)
            res //= 2
            skips.append(c)
    resnet_block(res, c, c)  # mid
    attention(res, c)
    resnet_block(res, c, c)
    for level in reversed(range(len(m.ch_mult))):
        for _ in range(m.num_res_blocks + 1):
            resnet_block(res, c + skips.pop(), m.ch * m.ch_mult[level])
            c = m.ch * m.ch_mult[level]
            if res in m.attn_resolutions:
                attention(res, c)
        if level > 0:
            res *= 2
            conv(res, c, c)
    norm(c)
    conv(res, c, out_ch)
    return count["params"], count["macs"]


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


CONFIG_NAMES = sorted(os.path.splitext(f)[0] for f in os.listdir(os.path.join(REPO, "configs"))
                      if f.endswith(".py") and f != "__init__.py")


def test_the_architecture_walk_gives_the_reference_counts():
    # docs/original.md §1.9: 35,746,307 parameters for CIFAR10, 113,673,219 at 256 px.
    assert _architecture_counts(_config("cifar10"))[0] == 35_746_307
    assert _architecture_counts(_config("celebahq256"))[0] == 113_673_219


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_every_config_builds_its_model(name):
    c = _config(name)
    out = info.model_info(c, flops=False)
    assert out["num_params"] == _architecture_counts(c)[0]
    # temb, conv_in, a down and an up scope per level, mid, norm_out, conv_out (+ class_embed).
    assert len(out["scopes"]) == 2 * len(c.model.ch_mult) + 5 + (c.model.num_classes > 1)


def test_info_mode_prints_counts_and_flops():
    result = subprocess.run(
        [sys.executable, "-m", "ddpm_jax.main", "--config", "configs/cifar10.py", "--mode=info"],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "parameters: 35,746,307 in 328 tensors" in result.stdout
    assert "up_1           7,155,712  (16x16, 256 ch)" in result.stdout
    flops_line = [line for line in result.stdout.splitlines() if "FLOPs per image" in line][0]
    gflops = float(flops_line.split(":")[1].split()[0])
    # 2 FLOPs per multiply-add of the convs, dense layers and attention products; XLA adds one per
    # element of the norms, activations and sums, under 1% here.
    matmul_gflops = 2 * _architecture_counts(_config("cifar10"))[1] / 1e9
    assert matmul_gflops - 0.005 <= gflops < 1.01 * matmul_gflops, (gflops, matmul_gflops)


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
        for name in CONFIG_NAMES:  # every config's batches split evenly over those devices
            c = _config(name)
            for batch in (c.training.batch_size, c.sample.batch_size, c.eval.batch_size,
                          c.eval.bpd_batch_size):
                assert batch % expected == 0, (name, batch)


def test_cpu_device_count_set_by_the_user_is_kept():
    from ddpm_jax import cli

    flags = "--xla_force_host_platform_device_count=8"
    assert cli.cpu_device_flags(flags, 2) == flags
