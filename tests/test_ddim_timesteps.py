"""DDIM timestep sequences for every step count S in 1..T (issue #13, 1.4): exactly S distinct
increasing steps that start near T−1, and the DDIM code's own sequence wherever that already
does so."""

import math

import numpy as np
import pytest
from diffusers import DDIMScheduler

from ddpm_jax import chains

T = 1000


def ddim_code_uniform(num_steps):
    """The DDIM code's `range(0, T, T // S)` (its `skip_type == "uniform"`)."""
    return list(range(0, T, T // num_steps))


def ddim_code_quad(num_steps):
    """The DDIM code's `skip_type == "quad"`: int((linspace(0, √(0.8 T), S))²)."""
    return [int(s) for s in np.linspace(0, math.sqrt(T * 0.8), num_steps) ** 2]


@pytest.mark.parametrize("kind", ["uniform", "quad"])
def test_every_step_count_gives_that_many_distinct_increasing_steps(kind):
    for num_steps in range(1, T + 1):
        timesteps = chains.ddim_timesteps(T, num_steps, kind)
        assert timesteps.shape == (num_steps,), num_steps
        assert timesteps[0] == 0 and timesteps[-1] <= T - 1, num_steps
        assert np.all(np.diff(timesteps) >= 1), num_steps


def test_uniform_steps_are_evenly_spaced_and_start_within_one_stride_of_t_minus_1():
    for num_steps in range(1, T + 1):
        timesteps = chains.ddim_timesteps(T, num_steps)
        stride = T / num_steps
        # The first step is the last one of its stride: T−1 − τ_{S−1} < T / S.
        assert T - 1 - timesteps[-1] < stride, num_steps
        gaps = np.diff(timesteps)
        assert np.all((gaps >= math.floor(stride)) & (gaps <= math.ceil(stride))), num_steps
        reference = ddim_code_uniform(num_steps)
        if len(reference) == num_steps:  # the DDIM code already has S steps: the very same
            np.testing.assert_array_equal(timesteps, reference, err_msg=str(num_steps))
    # The example: S = 501 started at t = 500 (√ᾱ = 0.28); now one step below T−1.
    assert chains.ddim_timesteps(T, 501)[-1] == T - 2
    assert chains.ddim_timesteps(T, 999)[-1] == T - 2
    np.testing.assert_array_equal(chains.ddim_timesteps(T, T), np.arange(T))


@pytest.mark.parametrize("num_steps", [d for d in range(1, T + 1) if T % d == 0])
def test_uniform_equals_diffusers_leading_spacing_where_s_divides_t(num_steps):
    reference = DDIMScheduler(num_train_timesteps=T)  # timestep_spacing="leading", offset 0
    reference.set_timesteps(num_steps)
    np.testing.assert_array_equal(chains.ddim_timesteps(T, num_steps),
                                  np.sort(reference.timesteps.numpy()))


def test_quad_keeps_the_ddim_code_sequence_and_its_start():
    kept = 0
    for num_steps in range(2, T + 1):
        timesteps = chains.ddim_timesteps(T, num_steps, "quad")
        reference = ddim_code_quad(num_steps)
        if np.all(np.diff(reference) >= 1):  # no repeats: unchanged
            np.testing.assert_array_equal(timesteps, reference, err_msg=str(num_steps))
            kept += 1
        if num_steps - 1 <= reference[-1]:  # S distinct steps fit below the quad rule's start
            assert timesteps[-1] == reference[-1], num_steps
        else:
            assert timesteps[-1] == num_steps - 1, num_steps
    assert kept >= 10  # the usual S = 10, 20, ... of the DDIM paper are among them
