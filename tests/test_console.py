"""The console of `python -m ddpm_jax.main`: our own INFO lines, everyone's warnings, and the
INFO lines of the libraries underneath (Orbax, absl, TensorFlow, JAX, CLU) only with --verbose."""

import os
import re
import subprocess
import sys

import pytest

from helpers import tiny_config_file, trained_workdir

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OURS = {name for name in os.listdir(os.path.join(REPO, "ddpm_jax")) if name.endswith(".py")}
INFO_LINE = re.compile(r"^I\d{4} [\d:.]+ +\d+ ([^:\]]+):\d+\] ")  # absl's format


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return trained_workdir(tmp_path_factory)


def _console(trained, tmp_path, *flags) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "ddpm_jax.main", "--config", tiny_config_file(tmp_path),
         "--workdir", trained, "--mode=sample", "--config.sample.num_samples=8",
         "--config.sample.batch_size=8", *flags],
        cwd=REPO, capture_output=True, text=True, timeout=600,
        env={**os.environ, "PYTHONPATH": REPO})
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stderr


def _info_sources(console: str) -> list[str]:
    return [m.group(1) for m in map(INFO_LINE.match, console.splitlines()) if m]


def test_default_console_has_only_our_info_lines(trained, tmp_path):
    console = _console(trained, tmp_path)
    sources = _info_sources(console)
    assert "sample_mode.py" in sources  # "sampled 8 / 8"
    assert set(sources) <= OURS, sorted(set(sources) - OURS)
    # TensorFlow's C++ start-up lines (absl's pre-init warning, port.cc's "oneDNN custom
    # operations are on") come in other formats than absl's Python one.
    assert "InitializeLog" not in console and "oneDNN" not in console, console[-2000:]


def test_verbose_adds_the_info_lines_of_the_libraries(trained, tmp_path):
    sources = _info_sources(_console(trained, tmp_path, "--verbose"))
    assert {source for source in sources if source.endswith(".py")} - OURS  # e.g. Orbax's


def test_training_console_has_no_tensorflow_start_up_lines(tmp_path):
    """Training imports TensorFlow (CLU's summary writer, the input pipeline), whose C++ side
    prints two lines at import unless told not to."""
    result = subprocess.run(
        [sys.executable, "-m", "ddpm_jax.main", "--config", tiny_config_file(tmp_path),
         "--workdir", str(tmp_path / "run"), "--config.training.num_steps=2"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
        env={**{k: v for k, v in os.environ.items() if not k.startswith("TF_")},
             "PYTHONPATH": REPO})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "done: step 2/2" in result.stderr + result.stdout
    assert "InitializeLog" not in result.stderr and "oneDNN" not in result.stderr, \
        result.stderr[-2000:]
