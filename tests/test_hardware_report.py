"""What a run says about its hardware: the persistent compilation cache on a second start,
TFLOP/s and utilisation in the console and TensorBoard, and a profile window's trace."""

import glob
import os
import re
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _train(workdir, cache_dir, *extra):
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    command = [sys.executable, "-m", "ddpm_jax.main", "--config", "configs/digits.py",
               "--workdir", workdir, f"--config.compilation_cache_dir={cache_dir}",
               "--config.model.num_res_blocks=1", "--config.training.num_steps=4",
               "--config.training.steps_per_call=2", "--config.training.log_every=2",
               "--config.training.sample_every=0", "--config.training.checkpoint_every=0",
               *extra]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stderr


def _compile_line(log):
    (line,) = [line for line in log.splitlines() if "compiled the train step in" in line]
    return line


def test_second_start_compiles_from_the_cache_and_reports_utilisation(tmp_path):
    cache = str(tmp_path / "xla_cache")
    first = _train(str(tmp_path / "a"), cache, "--config.training.profile_steps=(3, 4)")
    assert "from the compilation cache" not in _compile_line(first)
    assert glob.glob(os.path.join(cache, "*")), "the first start left nothing in the cache"
    second = _train(str(tmp_path / "b"), cache)
    assert "(from the compilation cache)" in _compile_line(second)

    # Console: XLA's FLOP count over the measured step time, and the CPU's measured peak.
    progress = [line for line in first.splitlines() if re.search(r"step \d+/4 loss", line)]
    assert len(progress) == 2
    assert all(re.search(r"[\d.e+-]+ TFLOP/s per device \(\d+% of peak\)", line)
               for line in progress), progress

    from tensorboard.backend.event_processing import event_accumulator
    from tensorboard.util import tensor_util

    acc = event_accumulator.EventAccumulator(str(tmp_path / "a"), size_guidance={"tensors": 0})
    acc.Reload()
    value = lambda tag: [float(tensor_util.make_ndarray(e.tensor_proto)) for e in acc.Tensors(tag)]
    tflops, fraction, rate = value("tflops_per_device"), value("fraction_of_peak"), value(
        "steps_per_sec")
    assert len(tflops) == len(fraction) == len(rate) == 2
    # TFLOP/s = FLOPs per step × steps/s: the same FLOP count at both log steps.
    per_step = [t / r for t, r in zip(tflops, rate)]
    assert abs(per_step[0] - per_step[1]) <= 1e-6 * per_step[0]
    assert 0 < fraction[0] < 2  # a fraction of the measured peak (noise may pass 1 a little)

    traces = glob.glob(str(tmp_path / "a" / "profile" / "plugins" / "profile" / "*" / "*.xplane.pb"))
    assert len(traces) == 1 and os.path.getsize(traces[0]) > 0
    assert not os.path.exists(tmp_path / "b" / "profile")
