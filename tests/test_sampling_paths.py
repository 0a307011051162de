"""Issue #15, items 1 and 4: the API (`Pipeline.sample`), the CLI (`--mode=sample`) and the
training grids draw their samples through one library, which keys every sample by its index, so
that for the same key they give the same labels and the same images whatever the batch size and
the number of devices.

A class-conditional model with perturbed weights (so that every output depends on x, t and the
label) and guidance w = 2; 20 samples of 10 classes in batches of 16 on 8 devices (the CLI) and
of 6 on 2 (the API), and a grid of 20 samples on 8 devices (calls of 24). The labels are the rule
of `--mode=sample`, written out here: class k for samples 2k and 2k + 1, over all 20 samples,
never restarting per call or counting the padding of the last call.
"""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from ddpm_jax import api, generate, parallel, train, train_step
from helpers import config_flags, override, save_checkpoint, tiny_config, tiny_config_file

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_DEVICES = 8
N, BATCH, CELL, PAD = 20, 16, 8, 2
OVERRIDES = {"model.num_classes": 10, "sample.guidance_scale": 2.0, "sample.method": "ddim",
             "sample.num_steps": 3, "sample.num_samples": N, "sample.batch_size": BATCH,
             "training.num_grid_samples": N, "training.grid_method": "sample"}
EXPECTED_LABELS = np.repeat(np.arange(10), 2)  # 20 samples of 10 classes: two per class


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(config, workdir with a checkpoint at step 1 of perturbed EMA weights, its state)."""
    config = override(tiny_config(), OVERRIDES)
    workdir = str(tmp_path_factory.mktemp("paths") / "run")
    return config, workdir, save_checkpoint(config, workdir, ema_noise=0.05)


def _cli_samples(workdir, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "ddpm_jax.main", "--config", tiny_config_file(tmp_path),
         "--workdir", workdir, "--mode=sample", *config_flags(OVERRIDES)],
        cwd=REPO, capture_output=True, text=True, timeout=900,
        env={**os.environ, "PYTHONPATH": REPO})
    assert result.returncode == 0, result.stderr[-3000:]
    [folder] = os.listdir(os.path.join(workdir, "samples"))
    return np.load(os.path.join(workdir, "samples", folder, "samples.npz"))


def _grid_cells(grid: np.ndarray, count: int, columns: int) -> np.ndarray:
    """The images of a row-major grid of `columns` columns: CELL px cells, PAD px between."""
    cells = []
    for i in range(count):
        row, column = divmod(i, columns)
        top, left = PAD + row * (CELL + PAD), PAD + column * (CELL + PAD)
        cells.append(grid[top:top + CELL, left:left + CELL])
    return np.stack(cells)


def test_cli_and_api_draw_the_same_labels_and_images(saved, tmp_path):
    config, workdir, _ = saved
    cli = _cli_samples(workdir, tmp_path)  # 8 devices, calls of 16
    np.testing.assert_array_equal(cli["labels"], EXPECTED_LABELS)
    pipe = api.load(workdir, devices=jax.local_devices()[:2])
    from_api = pipe.sample(N, config.sample.seed, batch_size=6)  # 2 devices, calls of 6
    assert from_api.shape == cli["images"].shape == (N, 8, 8, 1)
    np.testing.assert_array_equal(from_api, cli["images"])


@pytest.mark.parametrize("method,eta", [("ancestral", 0.0), ("ddim", 1.0)])
def test_a_seed_gives_the_same_samples_whatever_the_batch_and_device_count(saved, method, eta):
    """Sample i is a function of the key and i alone: its x_T and, for ancestral and DDIM
    η = 1 sampling, its noise at every step. 12 samples in calls of 4 on 2 devices and in one
    call of 12 on 4 devices, and the last two calls of 4 alone (a resumed set)."""
    config, _, state = saved
    config = override(config.copy_and_resolve_references(),
                      {"sample.method": method, "sample.num_steps": 0 if method == "ancestral" else 3,
                       "sample.ddim_eta": eta})
    graphdef, _ = train_step.abstract_train_state(config)
    key = jax.random.key(7)

    def draw(num_devices, batch_size, first_call=0, seed_key=key):
        mesh = parallel.make_mesh(jax.local_devices()[:num_devices])
        ema = jax.device_put(state.ema_params, parallel.replicated(mesh))
        return np.concatenate([samples for samples, _ in generate.batches(
            graphdef, ema, config, mesh, 12, seed_key, batch_size=batch_size,
            first_call=first_call)])

    in_fours = draw(2, 4)
    assert in_fours.shape == (12, 8, 8, 1)
    np.testing.assert_allclose(draw(4, 12), in_fours, atol=1e-5, rtol=0)
    np.testing.assert_allclose(draw(2, 4, first_call=1), in_fours[4:], atol=1e-5, rtol=0)
    # Not vacuous: the samples differ from each other and with the key.
    assert np.abs(in_fours[0] - in_fours[1]).max() > 1e-2
    assert np.abs(draw(2, 4, seed_key=jax.random.key(8)) - in_fours).max() > 1e-2


class _Writer:
    def write_images(self, step, pictures):
        self.step, self.pictures = step, pictures


def test_training_grid_has_a_row_per_class_and_the_labels_of_its_samples(saved, tmp_path):
    config, workdir, state = saved
    mesh = parallel.make_mesh()
    ema = jax.device_put(state.ema_params, parallel.replicated(mesh))
    writer = _Writer()
    step = 3
    graphdef, _ = train_step.abstract_train_state(config)
    train.write_sample_grid(config, str(tmp_path / "grids"), writer, graphdef,
                            state._replace(ema_params=ema), mesh, step)
    assert writer.step == step
    grid = writer.pictures["samples"][0]
    # One row per class, as --mode=sample's grid: 10 rows of the 2 samples of each class.
    rows, columns = 10, 2
    assert grid.shape == (PAD + rows * (CELL + PAD), PAD + columns * (CELL + PAD), 1)
    cells = _grid_cells(grid, N, columns)

    # The grid's one call has 24 rows (20 rounded up to the 8 devices) and the key of its step:
    # the API gives the same 20 samples in its own calls of 16.
    pipe = api.load(workdir)
    key = jax.random.fold_in(jax.random.key(config.sample.seed), step)
    np.testing.assert_array_equal(cells, pipe.sample(N, key))
    # ... whose labels are those of the 20 samples: the CLI's rule, not per call of 24.
    per_call = pipe.sample(24, key, batch_size=24)[:N]  # labels of 24 samples, 3 per class
    assert np.abs(cells.astype(int) - per_call.astype(int)).max() > 10
