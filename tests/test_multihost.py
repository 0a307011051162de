"""Two processes × 4 CPU devices (jax.distributed on 127.0.0.1) train exactly like one process ×
8 devices, and only process 0 writes logs and images.

Both runs go through the real command line (`python -m ddpm_jax.main`), so what is tested is
what a TPU pod slice runs: `parallel.maybe_initialize_distributed` from the JAX_* environment,
each process feeding its rows of the global batch, Orbax writing one checkpoint from both
processes into a shared directory, host-0-only TensorBoard/PNG output and the exit barrier.
"""

import glob
import os
import re
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from ddpm_jax import checkpointing, parallel, train_step
from helpers import tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(REPO, "tests")
TIMEOUT_SECONDS = 400

# The config file both runs load. It also records, per process, every file Python opens for
# writing or renames (an audit hook), so the test can tell which process wrote what.
CONFIG_FILE = '''
import atexit, os, sys
sys.path.insert(0, {tests!r})
from helpers import tiny_config

_written = []

def _audit(event, args):
    if event == "open" and args[1] and any(c in str(args[1]) for c in "wax+"):
        _written.append(str(args[0]))
    elif event in ("os.rename", "os.replace"):
        _written.append(str(args[1]))

def _dump():
    with open(os.path.join({record_dir!r}, "writes_" + os.environ.get("JAX_PROCESS_ID", "single")),
              "w") as f:
        f.write("\\n".join(_written))

sys.addaudithook(_audit)
atexit.register(_dump)

def get_config():
    config = tiny_config()
    config.training.sample_every = 4
    # Clipping groups of 4 examples span 2 of the 8 devices (2 examples each): their gradients
    # meet over ppermute inside each process before clipping, then average over both processes.
    config.training.clip_group_size = 4
    return config
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int, **extra) -> dict:
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={devices}"])
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONUNBUFFERED"] = "1"
    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        env.pop(name, None)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _command(config_file, workdir):
    return [sys.executable, "-m", "ddpm_jax.main", "--config", config_file, "--workdir", workdir]


def _final_loss(workdir) -> float:
    from tensorboard.backend.event_processing import event_accumulator
    from tensorflow import make_ndarray

    acc = event_accumulator.EventAccumulator(workdir, size_guidance={"tensors": 0})
    acc.Reload()
    (last,) = [e for e in acc.Tensors("loss") if e.step == 4]
    return float(make_ndarray(last.tensor_proto))


def _restore(workdir, step):
    config = tiny_config()
    manager = checkpointing.make_manager(workdir, read_only=True)
    _, abstract = train_step.abstract_train_state(config)
    # Placed on this process's 8 devices: the checkpoint's own shardings name 2 processes.
    shardings = jax.tree.map(lambda _: parallel.replicated(parallel.make_mesh()), abstract)
    state, restored = checkpointing.restore(manager, abstract, config, step=step,
                                            shardings=shardings)
    assert restored == step
    return jax.device_get(state)


def _max_diff(a, b) -> float:
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("multihost")
    config_file = root / "tiny_multihost.py"
    config_file.write_text(CONFIG_FILE.format(tests=TESTS, record_dir=str(root)))
    multi, single = str(root / "two_processes"), str(root / "one_process")

    # Only process 0 writes the persistent compilation cache, so with a warm cache process 0
    # would start each collective long before process 1 and gloo's connect would time out:
    # both processes compile from scratch instead.
    port = _free_port()
    logs = [open(root / f"process_{index}.log", "w+") for index in range(2)]
    processes = [subprocess.Popen(
        _command(str(config_file), multi), cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
        text=True,
        env=_env(4, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=2,
                 JAX_PROCESS_ID=index, JAX_ENABLE_COMPILATION_CACHE="false"))
        for index, log in enumerate(logs)]
    try:
        for process in processes:
            process.wait(timeout=TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired:
        for process in processes:
            process.kill()
            process.wait()
    outputs = []
    for log in logs:
        log.seek(0)
        outputs.append(log.read())
        log.close()
    for index, (process, output) in enumerate(zip(processes, outputs)):
        assert process.returncode == 0, f"process {index} failed:\n{output[-5000:]}"

    result = subprocess.run(_command(str(config_file), single), cwd=REPO, capture_output=True,
                            text=True, env=_env(8), timeout=TIMEOUT_SECONDS)
    assert result.returncode == 0, result.stderr[-5000:]
    return {"multi": multi, "single": single, "root": str(root),
            "pids": [p.pid for p in processes], "logs": outputs}


def test_both_processes_see_the_whole_8_device_mesh(runs):
    for index, log in enumerate(runs["logs"]):
        assert f"process {index} of 2; 4 local of 8 devices" in log


def test_two_processes_train_like_one_process_with_8_devices(runs):
    assert abs(_final_loss(runs["multi"]) - _final_loss(runs["single"])) <= 1e-5
    for step in (2, 4):
        multi, single = _restore(runs["multi"], step), _restore(runs["single"], step)
        assert int(multi.step) == int(single.step) == step
        assert _max_diff(multi.params, single.params) <= 1e-5
        assert _max_diff(multi.ema_params, single.ema_params) <= 1e-5
        assert _max_diff(multi.opt_state, single.opt_state) <= 1e-5


def test_only_process_0_writes_logs_and_images(runs):
    multi = runs["multi"]
    (events,) = glob.glob(os.path.join(multi, "events.out.tfevents.*"))
    # The event file is named <time>.<host>.<pid>.<n> (TensorFlow's writer adds .v2): it was
    # process 0's.
    assert re.search(r"\.(\d+)\.\d+(\.v2)?$", events).group(1) == str(runs["pids"][0])
    assert sorted(os.listdir(os.path.join(multi, "samples"))) == [
        "step_00000004.png", "step_00000004_progress.png"]
    def outputs(workdir):
        return sorted(name for name in os.listdir(workdir) if not name.startswith("events."))

    assert outputs(multi) == outputs(runs["single"]) == ["checkpoints", "samples"]

    def written(process):
        with open(os.path.join(runs["root"], f"writes_{process}")) as f:
            return [p for p in f.read().splitlines() if p.startswith(multi)]

    assert any("samples" in p for p in written(0))
    assert not [p for p in written(1) if "samples" in p or "events" in p]
