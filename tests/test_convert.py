"""Importers (`python -m ddpm_jax.convert`) and the notebook API (`ddpm_jax.load`).

References: TF1 checkpoints written here by TF's own `Saver`, `ExponentialMovingAverage` and
`AdamOptimizer` (so the shadow/slot names are TF's, not ours); diffusers' `UNet2DModel` forward
pass (an independent implementation); the literal variable names and count of docs/original.md §1.8.
"""

import contextlib
import io
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf
import torch
from diffusers import UNet2DModel
from flax import nnx

import ddpm_jax
from configs import default
from ddpm_jax import checkpointing, convert, model_fns, train_step
from ddpm_jax.unet import tf_variable_names

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GLOBAL_STEP = 1234

# google/ddpm-cifar10-32's published UNet2DModel config (its config.json, written out here;
# nothing is downloaded): the reference for `convert.diffusers_unet_config`.
PUBLISHED_CIFAR10_DIFFUSERS = dict(
    sample_size=32, in_channels=3, out_channels=3, block_out_channels=(128, 256, 256, 256),
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    layers_per_block=2, norm_eps=1e-6, norm_num_groups=32, downsample_padding=0,
    flip_sin_to_cos=False, freq_shift=1, attention_head_dim=None, act_fn="silu",
    time_embedding_type="positional", center_input_sample=False)


def small_config(**model):
    config = default.get_config()
    config.data.image_size = 16
    config.model.ch = 32
    config.model.ch_mult = (1, 2)
    config.model.num_res_blocks = 1
    config.model.attn_resolutions = (8,)
    config.model.dropout = 0.0
    config.model.update(model)
    config.sample.batch_size = 8
    return config


def cifar10_config():
    from configs import cifar10

    return cifar10.get_config()


def diffusers_config(config):
    return convert.diffusers_unet_config(nnx.eval_shape(lambda: model_fns.create_model(config)))


CIFAR10_DIFFUSERS = diffusers_config(cifar10_config())
# The same architecture family, small: 16x16, levels of 32 and 64 channels, attention at 8x8.
SMALL_DIFFUSERS = diffusers_config(small_config())


def one_device():
    return [jax.devices()[0]]


def random_inputs(batch, shape, seed):
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1, 1, (batch, *shape)).astype(np.float32)
    t = rng.integers(0, 1000, (batch,)).astype(np.int32)
    t[0] = 999
    return x, t


def torch_forward(model, x_nhwc, t):
    with torch.no_grad():
        out = model(torch.from_numpy(x_nhwc).permute(0, 3, 1, 2), torch.from_numpy(t).long()).sample
    return out.permute(0, 2, 3, 1).numpy()


def torch_to_tf_layout(value):
    """OIHW conv -> HWIO; (O, I) linear or (O, I, 1, 1) 1x1 conv -> [I, O]; vectors as they are."""
    value = value.detach().numpy()
    if value.ndim == 4 and value.shape[2:] == (1, 1):
        return value[:, :, 0, 0].T.copy()
    if value.ndim == 4:
        return value.transpose(2, 3, 1, 0).copy()
    if value.ndim == 2:
        return value.T.copy()
    return value.copy()


def write_tf1_checkpoint(prefix, weights, shadows=None, global_step=GLOBAL_STEP):
    """A checkpoint as the original training writes it: model weights, Adam slots, beta powers,
    global_step and (optionally) EMA shadows made by `tf.train.ExponentialMovingAverage`."""
    graph = tf.Graph()
    with graph.as_default():
        variables = {name: tf.compat.v1.get_variable(name, initializer=value)
                     for name, value in weights.items()}
        step = tf.compat.v1.train.get_or_create_global_step()
        loss = tf.add_n([tf.reduce_sum(tf.square(v)) for v in variables.values()])
        tf.compat.v1.train.AdamOptimizer(2e-4).minimize(loss, global_step=step)
        assigns = [step.assign(global_step)]
        if shadows is not None:
            ema = tf.compat.v1.train.ExponentialMovingAverage(0.9999)
            ema.apply(list(variables.values()))
            assigns += [ema.average(variables[name]).assign(value)
                        for name, value in shadows.items()]
        saver = tf.compat.v1.train.Saver()
        with tf.compat.v1.Session(graph=graph) as session:
            session.run(tf.compat.v1.global_variables_initializer())
            session.run(assigns)
            return saver.save(session, prefix, write_meta_graph=False)


def set_directly(model, values):
    """Assign values by TF name straight into the module's attributes (of an abstract model)."""
    for name, path in tf_variable_names(model).items():
        node = model
        for part in path[:-1]:
            node = node[part] if isinstance(part, int) else getattr(node, part)
        getattr(node, path[-1]).set_value(jnp.asarray(values[name]))
    return model


def leaves_by_tf_name(params, model):
    flat = {tuple(path): leaf for path, leaf in
            jax.tree_util.tree_flatten_with_path(params)[0]}
    return {name: np.asarray(flat[tuple(jax.tree_util.DictKey(p) for p in path)])
            for name, path in tf_variable_names(model).items()}


@nnx.jit
def _forward(model, x, t):
    return model(x, t)


# ----------------------------------------------------------------------------------------------
# Names (docs/original.md §1.8)
# ----------------------------------------------------------------------------------------------


def test_cifar10_model_has_the_reference_tf_names():
    model = nnx.eval_shape(lambda: model_fns.create_model(cifar10_config()))
    names = tf_variable_names(model)
    assert len(names) == 328  # "The CIFAR10 model has 328 variable tensors."
    for name in ["model/temb/dense0/W", "model/conv_in/W", "model/down_1/block_0/nin_shortcut/W",
                 "model/down_1/attn_0/q/W", "model/mid/attn_1/proj_out/b",
                 "model/up_0/block_2/norm2/gamma", "model/down_0/downsample/conv/W",
                 "model/up_1/upsample/conv/W", "model/norm_out/beta", "model/conv_out/W"]:
        assert name in names, name
    shapes = convert._parameter_shapes(model)
    assert shapes["model/conv_in/W"] == (3, 3, 3, 128)  # [kh, kw, in, out]
    assert shapes["model/temb/dense0/W"] == (128, 512)  # [in, out]
    assert shapes["model/up_1/block_2/nin_shortcut/W"] == (384, 256)  # 256 + hs[3] = 128 in


# ----------------------------------------------------------------------------------------------
# TF checkpoints
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tf_source(tmp_path_factory):
    """A small model's TF1 checkpoint: raw weights random, EMA shadows = a diffusers UNet's."""
    config = small_config()
    model = nnx.eval_shape(lambda: model_fns.create_model(config))
    torch.manual_seed(0)
    reference = UNet2DModel(**SMALL_DIFFUSERS).eval()
    with torch.no_grad():
        for parameter in reference.parameters():
            parameter.normal_(0.0, 0.05)  # so that near-zero-initialised paths matter
    reference_tensors = reference.state_dict()
    rng = np.random.default_rng(1)
    raw, shadows = {}, {}
    for name, shape in convert._parameter_shapes(model).items():
        raw[name] = rng.normal(0.0, 0.05, shape).astype(np.float32)
        shadows[name] = torch_to_tf_layout(
            reference_tensors[convert.diffusers_name(name, num_levels=2)])
        assert shadows[name].shape == shape, name
    directory = tmp_path_factory.mktemp("tf_source")
    prefix = write_tf1_checkpoint(str(directory / "model.ckpt-1234"), raw, shadows)
    return dict(config=config, prefix=prefix, raw=raw, shadows=shadows, reference=reference)


@pytest.fixture(scope="module")
def tf_converted(tf_source, tmp_path_factory):
    """The converted checkpoint, made by the command-line entry (minus flag parsing)."""
    workdir = str(tmp_path_factory.mktemp("tf_converted") / "run")
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = convert.run_cli("tf", tf_source["prefix"], tf_source["config"], workdir)
    assert code == 0
    return dict(workdir=workdir, stdout=stdout.getvalue(),
                directory=os.path.join(workdir, "checkpoints", str(GLOBAL_STEP)))


def test_tf_checkpoint_names_are_tfs_own(tf_source):
    names = dict(tf.train.list_variables(tf_source["prefix"]))
    assert "model/conv_in/W/ExponentialMovingAverage" in names
    assert "model/conv_in/W/Adam" in names and "model/conv_in/W/Adam_1" in names
    assert {"global_step", "beta1_power", "beta2_power"} <= set(names)


def test_tf_import_prefers_ema_and_keeps_raw_for_training(tf_source, tf_converted):
    said = tf_converted["stdout"]  # the tool says which weights it took
    assert "EMA shadows" in said and "raw weights as params" in said
    assert f"global_step {GLOBAL_STEP}" in said and tf_converted["directory"] in said
    assert os.path.isdir(tf_converted["directory"])

    # Restore exactly as training resumption does.
    config = tf_source["config"]
    manager = checkpointing.make_manager(tf_converted["workdir"], read_only=True)
    graphdef, abstract_state = train_step.abstract_train_state(config)
    state, step = checkpointing.restore(manager, abstract_state, config)
    assert step == GLOBAL_STEP and int(state.step) == GLOBAL_STEP
    model = nnx.eval_shape(lambda: model_fns.create_model(config))
    params = leaves_by_tf_name(state.params, model)
    ema_params = leaves_by_tf_name(state.ema_params, model)
    for name in tf_source["raw"]:
        np.testing.assert_array_equal(params[name], tf_source["raw"][name], err_msg=name)
        np.testing.assert_array_equal(ema_params[name], tf_source["shadows"][name], err_msg=name)
    assert int(state.opt_state[0].count) == 0  # fresh Adam
    assert all(not np.any(np.asarray(m)) for m in jax.tree.leaves(state.opt_state[0].mu))


@pytest.fixture(scope="module")
def tf_pipe(tf_converted):
    return ddpm_jax.load(tf_converted["workdir"], devices=one_device())


def test_loaded_tf_checkpoint_denoises_like_direct_model_and_diffusers(tf_source, tf_pipe):
    assert tf_pipe.step == GLOBAL_STEP
    assert tuple(tf_pipe.config.model.ch_mult) == (1, 2) and tf_pipe.config.data.image_size == 16

    x, t = random_inputs(8, (16, 16, 3), seed=2)
    got = np.asarray(tf_pipe.denoise(x, t))

    abstract = nnx.eval_shape(lambda: model_fns.create_model(tf_source["config"]))
    direct = set_directly(abstract, tf_source["shadows"])
    expected = np.asarray(_forward(direct, jnp.asarray(x), jnp.asarray(t)))
    assert np.abs(expected).max() > 0.05
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)

    # The EMA shadows are a diffusers UNet's weights, so diffusers' forward is a third opinion.
    assert np.abs(got - torch_forward(tf_source["reference"], x, t)).max() <= 1e-4

    # A scalar t broadcasts to the batch.
    by_scalar = np.asarray(tf_pipe.denoise(x, np.int32(t[0])))
    np.testing.assert_allclose(by_scalar[0], got[0], atol=1e-6, rtol=0)
    assert np.abs(by_scalar[1:] - got[1:]).max() > 1e-3  # other rows had other t


def test_load_accepts_a_checkpoint_directory(tf_converted, tf_pipe):
    same = ddpm_jax.load(tf_converted["directory"], devices=one_device())
    assert same.step == tf_pipe.step and same.config.to_dict() == tf_pipe.config.to_dict()
    for a, b in zip(jax.tree.leaves(same.params), jax.tree.leaves(tf_pipe.params)):
        np.testing.assert_array_equal(a, b)


def test_cli_parses_flags_and_reports_errors_in_one_line(tf_source, tf_converted):
    before = sorted(os.listdir(os.path.join(tf_converted["workdir"], "checkpoints")))
    command = [sys.executable, "-m", "ddpm_jax.convert", "--from", "tf", tf_source["prefix"],
               "--config", os.path.join(ROOT, "configs", "digits.py"),
               "--config.model.ch=32", "--workdir", tf_converted["workdir"]]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert "already holds checkpoints" in result.stderr
    assert sorted(os.listdir(os.path.join(tf_converted["workdir"], "checkpoints"))) == before


def small_shapes():
    model = nnx.eval_shape(lambda: model_fns.create_model(small_config()))
    return model, convert._parameter_shapes(model)


def test_plan_without_shadows_uses_raw_weights_and_ignores_optimizer_state():
    model, shapes = small_shapes()
    variables = dict(shapes)
    variables.update({f"{n}/Adam": s for n, s in shapes.items()})
    variables.update({f"{n}/Adam_1": s for n, s in shapes.items()})
    variables.update({"global_step": (), "beta1_power": (), "beta2_power": ()})
    plan = convert.plan_tf_import(variables, model)
    assert plan.params == plan.ema_params == {n: n for n in shapes}
    assert plan.ignored == 2 * len(shapes) + 3
    assert "raw weights" in plan.description and "no /ExponentialMovingAverage" in plan.description

    only_shadows = {f"{n}/ExponentialMovingAverage": s for n, s in shapes.items()}
    plan = convert.plan_tf_import(only_shadows, model)
    assert plan.params == plan.ema_params == {n: f"{n}/ExponentialMovingAverage" for n in shapes}


def test_plan_errors_name_the_variable():
    model, shapes = small_shapes()
    ema = "/ExponentialMovingAverage"

    partial = {**shapes, **{n + ema: s for n, s in shapes.items() if n != "model/mid/attn_1/k/b"}}
    with pytest.raises(ValueError, match="model/mid/attn_1/k/b/ExponentialMovingAverage"):
        convert.plan_tf_import(partial, model)

    missing = {n: s for n, s in shapes.items() if n != "model/up_1/block_1/norm2/gamma"}
    with pytest.raises(ValueError, match="model/up_1/block_1/norm2/gamma"):
        convert.plan_tf_import(missing, model)

    extra = {**shapes, "model/down_0/attn_0/q/W": (32, 32)}
    with pytest.raises(ValueError, match="model/down_0/attn_0/q/W"):
        convert.plan_tf_import(extra, model)

    wrong = {**shapes, "model/conv_out/W": (3, 3, 32, 6)}
    with pytest.raises(ValueError, match=r"model/conv_out/W.*\(3, 3, 32, 6\)"):
        convert.plan_tf_import(wrong, model)

    with pytest.raises(ValueError, match="no 'model/...' variables"):
        convert.plan_tf_import({"global_step": ()}, model)


def test_damaged_or_mismatched_tf_checkpoints_write_nothing(tf_source, tmp_path):
    source = os.path.dirname(tf_source["prefix"])
    damaged = tmp_path / "damaged"
    shutil.copytree(source, damaged)
    prefix = str(damaged / os.path.basename(tf_source["prefix"]))
    data_file = prefix + ".data-00000-of-00001"
    os.truncate(data_file, os.path.getsize(data_file) // 2)

    cases = [
        (prefix, tf_source["config"], "truncated or corrupt"),
        (tf_source["prefix"], small_config(ch=64), r"shape mismatch for TF variable 'model/"),
        (tf_source["prefix"], small_config(attn_resolutions=()), r"'model/down_1/attn_0/"),
        (str(tmp_path / "nothing" / "model.ckpt-1"), tf_source["config"], "no TF checkpoint"),
    ]
    for i, (path, config, message) in enumerate(cases):
        workdir = tmp_path / f"out{i}"
        with pytest.raises((ValueError, FileNotFoundError), match=message):
            convert.convert("tf", path, config, str(workdir))
        assert not workdir.exists()


# ----------------------------------------------------------------------------------------------
# The notebook API's sampler
# ----------------------------------------------------------------------------------------------


def test_sample_on_all_devices(tf_converted, tf_pipe):
    pipe = ddpm_jax.load(tf_converted["workdir"])  # every (8 simulated) device
    assert pipe.mesh.devices.size == 8
    key = jax.random.key(7)
    floats = pipe.sample(8, key, method="ddim", ddim_steps=2, output="float")
    assert floats.shape == (8, 16, 16, 3) and floats.dtype == np.float32
    # Sample i keyed fold_in(key, i): the first 8 of 16 repeat the 8, the next 8 are new ones.
    sixteen = pipe.sample(16, key, method="ddim", ddim_steps=2, output="float")
    np.testing.assert_array_equal(sixteen[:8], floats)
    assert np.abs(sixteen[8:] - floats).max() > 0.1

    first = pipe.sample(3, key, method="ddim", ddim_steps=2)  # a partial batch, trimmed
    assert first.shape == (3, 16, 16, 3) and first.dtype == np.uint8
    np.testing.assert_array_equal(first, np.round((floats[:3] + 1) * 127.5).clip(0, 255))
    assert not np.array_equal(first, pipe.sample(3, 8, method="ddim", ddim_steps=2))

    with pytest.raises(ValueError, match="ddim_stpes"):
        pipe.sample(2, key, ddim_stpes=3)

    # Batch divisible by the 8 devices: split over them; same numbers as on one device.
    x, t = random_inputs(8, (16, 16, 3), seed=2)
    np.testing.assert_allclose(np.asarray(pipe.denoise(x, t)), np.asarray(tf_pipe.denoise(x, t)),
                               atol=1e-5, rtol=0)


def test_load_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoints"):
        ddpm_jax.load(str(tmp_path))


# ----------------------------------------------------------------------------------------------
# diffusers folders
# ----------------------------------------------------------------------------------------------


def test_diffusers_unet_config_is_the_published_one_and_passes_its_own_check():
    built = CIFAR10_DIFFUSERS
    assert {k: v for k, v in built.items() if k != "dropout"} == PUBLISHED_CIFAR10_DIFFUSERS
    assert built["dropout"] == 0.1  # configs/cifar10.py's, for training a diffusers copy
    from configs import celebahq256

    for config in (cifar10_config(), small_config(), celebahq256.get_config()):
        model = nnx.eval_shape(lambda: model_fns.create_model(config))
        built = convert.diffusers_unet_config(model)
        convert.check_diffusers_config(built, model)  # accepts exactly what the builder makes
        for key, value in built.items():  # and each built value is one it checks, but dropout
            if key == "dropout":
                continue
            other = value + 1 if isinstance(value, (int, float)) and not isinstance(value, bool) \
                else (not value if isinstance(value, bool) else None)
            if key in ("block_out_channels",):
                other = tuple(2 * c for c in value)
            if key in ("down_block_types", "up_block_types"):
                other = tuple(reversed(value)) if tuple(reversed(value)) != value else value[:-1]
            if key in ("act_fn", "time_embedding_type"):
                other = "relu" if key == "act_fn" else "fourier"
            if key == "attention_head_dim":
                other = 8
            with pytest.raises(ValueError, match=key):
                convert.check_diffusers_config({**built, key: other}, model)
    conditional = small_config(num_classes=10)
    with pytest.raises(ValueError, match="class-conditional"):
        convert.diffusers_unet_config(nnx.eval_shape(lambda: model_fns.create_model(conditional)))


@pytest.fixture(scope="module")
def cifar10_reference():
    torch.manual_seed(3)
    return UNet2DModel(**CIFAR10_DIFFUSERS).eval()  # diffusers' own random initialisation


def test_diffusers_cifar10_folder_converts_and_denoises_like_diffusers(cifar10_reference, tmp_path):
    assert sum(p.numel() for p in cifar10_reference.parameters()) == 35_746_307
    folder = tmp_path / "ddpm-cifar10-32"
    cifar10_reference.save_pretrained(folder)
    assert (folder / "diffusion_pytorch_model.safetensors").exists()
    workdir = tmp_path / "run"
    weights, _ = convert.convert("diffusers", str(folder), cifar10_config(), str(workdir))
    assert "diffusion_pytorch_model.safetensors" in weights.description

    pipe = ddpm_jax.load(str(workdir), devices=one_device())
    assert pipe.step == 0
    x, t = random_inputs(2, (32, 32, 3), seed=4)
    t[1] = 0
    expected = torch_forward(cifar10_reference, x, t)
    got = np.asarray(pipe.denoise(x, t))
    assert np.abs(expected).max() > 0.05
    assert np.abs(got - expected).max() <= 1e-4


def test_diffusers_bin_reads_like_safetensors(cifar10_reference, tmp_path):
    cifar10_reference.save_pretrained(tmp_path / "st")
    # A pipeline snapshot keeps the UNet in unet/; the importer looks there too.
    cifar10_reference.save_pretrained(tmp_path / "pipeline" / "unet", safe_serialization=False)
    assert (tmp_path / "pipeline" / "unet" / "diffusion_pytorch_model.bin").exists()
    config_st, tensors_st, _ = convert.read_diffusers_folder(str(tmp_path / "st"))
    config_bin, tensors_bin, file = convert.read_diffusers_folder(str(tmp_path / "pipeline"))
    assert file.endswith(".bin") and config_bin == config_st
    assert tensors_bin.keys() == tensors_st.keys() == cifar10_reference.state_dict().keys()
    for key, value in cifar10_reference.state_dict().items():
        np.testing.assert_array_equal(tensors_bin[key], value.numpy(), err_msg=key)
        np.testing.assert_array_equal(tensors_st[key], value.numpy(), err_msg=key)


def test_damaged_or_mismatched_diffusers_folders_write_nothing(tmp_path):
    torch.manual_seed(5)
    small = UNet2DModel(**SMALL_DIFFUSERS).eval()
    small.save_pretrained(tmp_path / "small")
    truncated = tmp_path / "truncated"
    shutil.copytree(tmp_path / "small", truncated)
    weights_file = truncated / "diffusion_pytorch_model.safetensors"
    os.truncate(weights_file, os.path.getsize(weights_file) // 2)

    cases = [
        (truncated, small_config(), "truncated or corrupt"),
        (tmp_path / "small", small_config(ch=64), "block_out_channels"),
        (tmp_path / "small", cifar10_config(), "sample_size|block_out_channels"),
        (tmp_path / "missing", small_config(), "no diffusers model folder"),
    ]
    for i, (folder, config, message) in enumerate(cases):
        workdir = tmp_path / f"out{i}"
        with pytest.raises((ValueError, FileNotFoundError), match=message):
            convert.convert("diffusers", str(folder), config, str(workdir))
        assert not workdir.exists()
