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


def _info_sources(trained, tmp_path, *flags) -> list[str]:
    result = subprocess.run(
        [sys.executable, "-m", "ddpm_jax.main", "--config", tiny_config_file(tmp_path),
         "--workdir", trained, "--mode=sample", "--config.sample.num_samples=8",
         "--config.sample.batch_size=8", *flags],
        cwd=REPO, capture_output=True, text=True, timeout=600,
        env={**os.environ, "PYTHONPATH": REPO})
    assert result.returncode == 0, result.stderr[-3000:]
    return [m.group(1) for m in map(INFO_LINE.match, result.stderr.splitlines()) if m]


def test_default_console_has_only_our_info_lines(trained, tmp_path):
    sources = _info_sources(trained, tmp_path)
    assert "sample_mode.py" in sources  # "sampled 8 / 8"
    # TensorFlow's C++ start-up line (port.cc: "oneDNN custom operations are on") ignores
    # TF_CPP_MIN_LOG_LEVEL; the Python side is what --verbose controls.
    python_sources = {source for source in sources if source.endswith(".py")}
    assert python_sources <= OURS, sorted(python_sources - OURS)


def test_verbose_adds_the_info_lines_of_the_libraries(trained, tmp_path):
    sources = _info_sources(trained, tmp_path, "--verbose")
    assert {source for source in sources if source.endswith(".py")} - OURS  # e.g. Orbax's
