"""`benchmarks/common.profile_ops`: FLOP/s per kind count every execution of an instruction."""

import os
import sys

import jax
import jax.numpy as jnp
import pytest
from jax import lax

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks"))
import common  # noqa: E402


def test_flops_count_each_iteration_of_a_scan(tmp_path):
    """A 3-step scan over one 3x3 convolution runs it 3 times: 3 · 2·B·H·W·C²·9 FLOPs."""
    batch, size, c_in, steps = 2, 8, 4, 3
    x = jnp.ones((batch, size, size, c_in))
    w = jnp.full((3, 3, c_in, c_in), 0.01)

    def body(h, _):
        out = lax.conv_general_dilated(h, w, (1, 1), ((1, 1), (1, 1)),
                                       dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return out, None

    fn = jax.jit(lambda x: lax.scan(body, x, None, length=steps)[0])
    compiled = fn.lower(x).compile()
    compiled(x).block_until_ready()
    profile = common.profile_ops(lambda: compiled(x).block_until_ready(), str(tmp_path),
                                 compiled.as_text())
    forward = profile["by_category"]["convolution: forward"]
    assert forward["gflop"] == pytest.approx(steps * 2 * batch * size * size * c_in * c_in * 9 / 1e9)
