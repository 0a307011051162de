"""benchmarks/gpu.sh: it cannot run here (no GPU), so check what can go wrong before a user with a
GPU runs it: shell mistakes, and flags the benchmark scripts do not accept."""

import importlib.util
import re
import shlex
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPT = BENCHMARKS / "gpu.sh"


def test_gpu_script_passes_shellcheck():
    from helpers import shellcheck_findings

    assert shellcheck_findings(SCRIPT) == ""


def _benchmark_commands() -> list[tuple[str, list[str]]]:
    """(script name, its arguments) of each `python benchmarks/X.py ...` line, continuation
    lines joined and the loop variables given one of their values."""
    text = SCRIPT.read_text().replace("\\\n", " ")
    commands = []
    for line in text.splitlines():
        match = re.search(r"python benchmarks/(\w+)\.py (.*?)(\||$)", line)
        if match:
            args = match.group(2).replace("$dtype", "bfloat16").replace("$batch", "16")
            commands.append((match.group(1), shlex.split(args)))
    return commands


def test_gpu_script_passes_only_flags_the_benchmarks_accept():
    commands = _benchmark_commands()
    assert {name for name, _ in commands} == {"train_throughput", "sample_throughput"}
    for name, args in commands:
        spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        parsed = module.parse_args(args)  # argparse exits (SystemExit) on an unknown flag
        assert parsed.platform == "cuda" and parsed.torch, (name, args)
        assert "model.dtype=bfloat16" in parsed.set
    with pytest.raises(SystemExit):
        module.parse_args(["--platform", "tpu"])
