"""Each CPU formulation of `ddpm_jax.conv` against XLA's own gradients (`jax.vjp` of
`lax.conv_general_dilated`), at the learner shapes (batch 64, 32-64 channels, 28-32 px), the
1- and 3-channel input layers, odd sizes and stride 2."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from ddpm_jax import conv

NHWC = ("NHWC", "HWIO", "NHWC")

# (batch, size, in, out, stride); SAME padding as the UNet's `_conv3x3`.
SHAPES = [
    (64, 28, 1, 32, 1),   # conv_in of a 28 px grey model
    (64, 32, 3, 32, 1),   # conv_in of a 32 px colour model
    (64, 28, 32, 32, 1),
    (64, 28, 32, 32, 2),  # downsample 28 -> 14
    (64, 14, 64, 64, 2),  # downsample 14 -> 7
    (64, 7, 64, 64, 1),   # the 7x7 attention level
    (64, 7, 3, 32, 2),    # odd size, stride 2, few channels
    (8, 7, 1, 8, 2),
    (64, 32, 64, 32, 1),
    (64, 28, 32, 1, 1),   # conv_out to one channel
]


def _native(x, w, stride):
    return lax.conv_general_dilated(x, w, (stride, stride), "SAME", dimension_numbers=NHWC)


def _ours(x, w, stride):
    return conv.conv_general_dilated(x, w, (stride, stride), "SAME", dimension_numbers=NHWC)


def _relative(a, b):
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / np.max(np.abs(np.asarray(b))))


@pytest.mark.parametrize("batch,size,c_in,c_out,stride", SHAPES)
def test_cpu_formulations_equal_xla_gradients(monkeypatch, batch, size, c_in, c_out, stride):
    monkeypatch.setattr(conv, "KERNEL_GRAD", "explicit")
    kx, kw, kg = jax.random.split(jax.random.key(size * 100 + c_in), 3)
    x = jax.random.normal(kx, (batch, size, size, c_in))
    w = jax.random.normal(kw, (3, 3, c_in, c_out))
    out = _native(x, w, stride)
    g = jax.random.normal(kg, out.shape)
    want = jax.jit(lambda x, w, g: (out, *jax.vjp(lambda x, w: _native(x, w, stride), x, w)[1](g)))
    got = jax.jit(lambda x, w, g: (_ours(x, w, stride),
                                   *jax.vjp(lambda x, w: _ours(x, w, stride), x, w)[1](g)))
    for name, a, b in zip(("y", "dx", "dw"), got(x, w, g), want(x, w, g)):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        assert _relative(a, b) <= 1e-5, name


@pytest.mark.parametrize("formulation", ["canonical", "im2col"])
@pytest.mark.parametrize("c_in,stride", [(1, 1), (3, 2), (32, 1), (32, 2)])
def test_each_kernel_gradient_formulation_equals_xla(formulation, c_in, stride):
    """Both kernel-gradient formulations at every kind of shape, whichever the rule picks."""
    batch, size, c_out = 16, 7, 8
    kx, kg = jax.random.split(jax.random.key(c_in + stride), 2)
    x = jax.random.normal(kx, (batch, size, size, c_in))
    w = jax.numpy.zeros((3, 3, c_in, c_out))
    padding = tuple(lax.padtype_to_pads((size, size), (3, 3), (stride, stride), "SAME"))
    g = jax.random.normal(kg, _native(x, w, stride).shape)
    want = jax.vjp(lambda w: _native(x, w, stride), w)[1](g)[0]
    fn = {"canonical": conv._kernel_grad_canonical, "im2col": conv._kernel_grad_im2col}[formulation]
    got = fn(x, g, (3, 3), (stride, stride), padding, None)
    assert got.shape == want.shape
    assert _relative(got, want) <= 1e-5


def test_tpu_and_gpu_keep_xla_gradients(monkeypatch):
    """Off the CPU backend `auto` is XLA's own convolution and gradients, op for op."""
    monkeypatch.setattr(conv, "KERNEL_GRAD", "auto")
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    x = jax.numpy.ones((2, 8, 8, 1))
    w = jax.numpy.ones((3, 3, 1, 4))
    loss = lambda w: _ours(x, w, 1).sum()
    hlo = jax.jit(jax.grad(loss)).lower(w).as_text()
    assert "conv_kernel_gradient" not in hlo and "conv_input_gradient" not in hlo


# The clipping groups (ddpm_jax/gradients.py) vmap the gradient over the groups of a device's
# shard: (groups, examples per group, size, in, out, stride).
GROUPED_SHAPES = [
    (4, 16, 28, 32, 32, 1),  # the learner step: 2 devices x 64 = 4 groups of 16 per device
    (4, 16, 28, 1, 32, 1),   # its 1-channel conv_in (the im2col kernel gradient)
    (2, 8, 32, 3, 16, 1),    # a 3-channel input layer
    (4, 16, 28, 32, 32, 2),  # downsample 28 -> 14
    (2, 16, 7, 64, 32, 1),   # odd size 7x7
    (3, 4, 7, 8, 8, 2),      # odd size, stride 2
    (2, 16, 14, 96, 32, 1),  # a concat input of the up path
]


def _kernel_grad(conv_fn, stride):
    """dW of the SAME 3x3 convolution of x against cotangent g."""
    def dw(x, g):
        w = jax.numpy.zeros((3, 3, x.shape[-1], g.shape[-1]))
        return jax.vjp(lambda w: conv_fn(x, w, stride), w)[1](g)[0]
    return dw


def _grouped_inputs(groups, batch, size, c_in, c_out, stride, seed=0):
    kx, kg = jax.random.split(jax.random.key(seed), 2)
    out = -(-size // stride)
    return (jax.random.normal(kx, (groups, batch, size, size, c_in)),
            jax.random.normal(kg, (groups, batch, out, out, c_out)))


@pytest.mark.parametrize("groups,batch,size,c_in,c_out,stride", GROUPED_SHAPES)
def test_vmapped_kernel_gradient_equals_xla_and_is_not_a_grouped_convolution(
        monkeypatch, groups, batch, size, c_in, c_out, stride):
    """Under vmap XLA would batch the kernel gradient into a convolution with
    feature_group_count = groups, which XLA:CPU runs 4-7x slower; each group gets its own."""
    monkeypatch.setattr(conv, "KERNEL_GRAD", "explicit")
    x, g = _grouped_inputs(groups, batch, size, c_in, c_out, stride)
    ours = jax.jit(jax.vmap(_kernel_grad(_ours, stride)))
    want = jax.jit(jax.vmap(_kernel_grad(_native, stride)))(x, g)
    got = ours(x, g)
    assert got.shape == want.shape == (groups, 3, 3, c_in, c_out)
    assert _relative(got, want) <= 1e-5
    hlo = ours.lower(x, g).compile().as_text()
    assert "feature_group_count" not in hlo


@pytest.mark.parametrize("c_in,stride", [(1, 1), (32, 1), (32, 2)])
def test_vmapped_gradients_inside_a_scan_equal_xla(monkeypatch, c_in, stride):
    """The train step's situation: per-group gradients of a shared kernel inside lax.scan."""
    monkeypatch.setattr(conv, "KERNEL_GRAD", "explicit")
    x, _ = _grouped_inputs(4, 16, 28, c_in, 8, stride, seed=c_in + stride)
    w0 = jax.random.normal(jax.random.key(5), (3, 3, c_in, 8)) * 0.1

    def train(conv_fn):
        def body(w, _):
            loss = lambda w, x: jax.numpy.sum(conv_fn(x, w, stride) ** 2)
            per_group = jax.vmap(jax.grad(loss), in_axes=(None, 0))(w, x)
            return w - 1e-4 * per_group.sum(0), per_group
        return jax.jit(lambda w: lax.scan(body, w, None, length=2))(w0)

    (w_ours, grads_ours), (w_want, grads_want) = train(_ours), train(_native)
    assert _relative(grads_ours, grads_want) <= 1e-5
    assert _relative(w_ours, w_want) <= 1e-5


def test_kernel_gradient_under_nested_and_partial_vmaps_equals_xla(monkeypatch):
    monkeypatch.setattr(conv, "KERNEL_GRAD", "explicit")
    x, g = _grouped_inputs(6, 4, 7, 8, 4, 1, seed=7)
    x, g = x.reshape(2, 3, *x.shape[1:]), g.reshape(2, 3, *g.shape[1:])
    for name, wrap in [("nested", lambda f: jax.vmap(jax.vmap(f))),
                       ("x only", lambda f: jax.vmap(f, in_axes=(0, None))),
                       ("g only", lambda f: jax.vmap(f, in_axes=(None, 0)))]:
        args = {"nested": (x, g), "x only": (x[0], g[0, 0]), "g only": (x[0, 0], g[0])}[name]
        got = jax.jit(wrap(_kernel_grad(_ours, 1)))(*args)
        want = jax.jit(wrap(_kernel_grad(_native, 1)))(*args)
        assert got.shape == want.shape, name
        assert _relative(got, want) <= 1e-5, name


def test_many_vmapped_slices_are_looped_and_equal_xla(monkeypatch):
    """More slices than conv.MAX_UNROLLED_SLICES: a loop over them, not one product each."""
    monkeypatch.setattr(conv, "KERNEL_GRAD", "explicit")
    monkeypatch.setattr(conv, "MAX_UNROLLED_SLICES", 2)
    x, g = _grouped_inputs(5, 2, 7, 4, 4, 2, seed=9)
    ours = jax.jit(jax.vmap(_kernel_grad(_ours, 2)))
    want = jax.jit(jax.vmap(_kernel_grad(_native, 2)))(x, g)
    assert _relative(ours(x, g), want) <= 1e-5
    hlo = ours.lower(x, g).compile().as_text()
    assert "feature_group_count" not in hlo and "while" in hlo


def test_without_the_vmap_rule_xla_batches_the_kernel_gradient_into_a_grouped_convolution(
        monkeypatch):
    """The cause the rule removes (and the A/B switch of benchmarks/train_throughput.py)."""
    monkeypatch.setattr(conv, "KERNEL_GRAD", "explicit")
    monkeypatch.setattr(conv, "PER_SLICE_UNDER_VMAP", False)
    x, g = _grouped_inputs(4, 2, 7, 8, 8, 1)
    ours = jax.jit(jax.vmap(_kernel_grad(_ours, 1)))
    assert "feature_group_count=4" in ours.lower(x, g).compile().as_text()
    assert _relative(ours(x, g), jax.vmap(_kernel_grad(_native, 1))(x, g)) <= 1e-5


def test_benchmark_baseline_switches(capsys):
    """benchmarks/train_throughput.py --baseline: the A/B switch of the old kernel gradient."""
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks"))
    import train_throughput

    assert train_throughput.parse_switches(["conv.PER_SLICE_UNDER_VMAP=False"]) == [
        (conv, "PER_SLICE_UNDER_VMAP", False)]
    for bad in ["conv.NO_SUCH_SWITCH=1", "nomodule.X=1", "conv.PER_SLICE_UNDER_VMAP=maybe"]:
        with pytest.raises(SystemExit) as exit_info:
            train_throughput.parse_switches([bad])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and bad in err
        assert "is not MODULE.ATTR=VALUE of an existing ddpm_jax attribute" in err


def test_benchmark_baseline_xla_options(capsys):
    """benchmarks/train_throughput.py --baseline_xla_option: XLA options for one program."""
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks"))
    import train_throughput

    assert train_throughput.parse_xla_options(
        ["xla_cpu_opt_preset=CPU_OPT_PRESET_FAST_RUNTIME", "xla_cpu_enable_fast_math=True",
         "xla_cpu_prefer_vector_width=512"]) == {
        "xla_cpu_opt_preset": "CPU_OPT_PRESET_FAST_RUNTIME", "xla_cpu_enable_fast_math": True,
        "xla_cpu_prefer_vector_width": 512}
    for bad in ["opt_preset=FAST", "xla_cpu_opt_preset", "xla_cpu_opt_preset="]:
        with pytest.raises(SystemExit) as exit_info:
            train_throughput.parse_xla_options([bad])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and repr(bad) in err

    lowered = jax.jit(lambda x: jnp.sin(x) * 2.0).lower(jnp.ones(4))
    # The option reaches XLA: a value it does not know is refused, as one line and status 2.
    with pytest.raises(SystemExit) as exit_info:
        train_throughput.compile_with(lowered, {"xla_cpu_opt_preset": "NO_SUCH_PRESET"})
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: XLA refused") and err.count("\n") == 1, err
    assert "xla_cpu_opt_preset" in err
    compiled = train_throughput.compile_with(
        lowered, {"xla_cpu_opt_preset": "CPU_OPT_PRESET_FAST_RUNTIME"})
    assert float(compiled(jnp.ones(4))[0]) == pytest.approx(2.0 * np.sin(1.0), rel=1e-6)
