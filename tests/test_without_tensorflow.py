"""The core runs on a host with only the JAX stack: train, sample and eval with TensorFlow (and
TFDS, which needs it) made unimportable, on in-memory digits and local files."""

import os
import subprocess
import sys
import textwrap

from test_summaries import BLOCK_TENSORFLOW

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_train_sample_eval_without_tensorflow(tmp_path):
    script = BLOCK_TENSORFLOW + textwrap.dedent(f"""
        import glob, json, os
        import numpy as np
        import ddpm_jax
        from ddpm_jax import inception, modes
        from helpers import tiny_config

        tmp = {str(tmp_path)!r}
        rng = np.random.default_rng(0)
        weights = {{}}
        for name, shape in inception.expected_state_dict_shapes().items():
            scale = np.sqrt(2.0 / np.prod(shape[1:])) if name.endswith("conv.weight") else 0.0
            weights[name] = (np.ones(shape) if name.endswith(("bn.weight", "running_var"))
                             else rng.normal(size=shape) * scale)
        np.savez(os.path.join(tmp, "inception.npz"), **weights)
        np.savez(os.path.join(tmp, "stats.npz"), mu=np.zeros(2048), sigma=np.eye(2048))

        config = tiny_config()
        config.training.num_steps = 2
        config.eval.num_samples = 8
        config.eval.batch_size = 8
        config.eval.is_splits = 1
        config.eval.inception_weights = os.path.join(tmp, "inception.npz")
        config.eval.train_stats = config.eval.test_stats = os.path.join(tmp, "stats.npz")
        workdir = os.path.join(tmp, "run")
        for mode in ("train", "sample", "eval"):
            modes.run_mode(mode, config, workdir)
        assert "tensorflow" not in sys.modules and "tensorflow_datasets" not in sys.modules
        print(json.dumps({{"checkpoints": sorted(os.listdir(os.path.join(workdir, "checkpoints"))),
                          "samples": glob.glob(os.path.join(workdir, "samples", "*", "samples.npz")),
                          "eval": glob.glob(os.path.join(workdir, "eval", "*.json")),
                          "events": glob.glob(os.path.join(workdir, "events.out.tfevents.*"))}}))
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.path.join(REPO, "tests")]))
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    import json

    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert found["checkpoints"] == ["2"]
    assert len(found["samples"]) == 1 and len(found["eval"]) == 1 and found["events"]
