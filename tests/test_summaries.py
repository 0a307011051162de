"""Our TensorBoard writer, read back by TensorBoard's own event reader, with TensorFlow blocked."""

import os
import subprocess
import sys
import textwrap

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def hide_modules(*names: str) -> str:
    """Python source that makes `names` look uninstalled: the path finder no longer sees them,
    so `import` raises ModuleNotFoundError and `importlib.util.find_spec` returns None."""
    return textwrap.dedent(f"""
        import importlib.machinery, sys
        class _Hidden(importlib.machinery.PathFinder):
            @classmethod
            def find_spec(cls, name, path=None, target=None):
                if name.split(".")[0] in {names!r}:
                    return None
                return super().find_spec(name, path, target)
        sys.meta_path = [_Hidden if f is importlib.machinery.PathFinder else f
                         for f in sys.meta_path]
    """)


BLOCK_TENSORFLOW = hide_modules("tensorflow", "tensorflow_datasets")


def test_scalars_images_and_hparams_read_back_without_tensorflow(tmp_path):
    logdir = str(tmp_path / "logs")
    script = BLOCK_TENSORFLOW + textwrap.dedent(f"""
        import numpy as np
        from ddpm_jax.summaries import SummaryWriter
        w = SummaryWriter({logdir!r})
        w.write_hparams({{"training.lr": 2e-4, "model.ch_mult": (1, 2), "data.name": "digits"}})
        w.write_scalars(3, {{"loss": 0.25, "steps_per_sec": 7.5}})
        w.write_scalars(5, {{"loss": 0.125}})
        grid = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4, 1) * 10
        w.write_images(5, {{"samples": grid[:1], "pair": grid}})
        w.close()
        SummaryWriter({str(tmp_path / "other")!r}, enabled=False).write_scalars(1, {{"x": 1.0}})
        assert "tensorflow" not in sys.modules
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert not os.path.exists(tmp_path / "other")  # a disabled writer (process > 0) writes nothing

    import io

    import numpy as np
    from PIL import Image
    from tensorboard.backend.event_processing import event_accumulator
    from tensorboard.util import tensor_util

    acc = event_accumulator.EventAccumulator(logdir, size_guidance={"tensors": 0, "images": 0})
    acc.Reload()
    loss = [(e.step, float(tensor_util.make_ndarray(e.tensor_proto))) for e in acc.Tensors("loss")]
    assert loss == [(3, 0.25), (5, 0.125)]
    assert [float(tensor_util.make_ndarray(e.tensor_proto)) for e in acc.Tensors("steps_per_sec")] == [7.5]
    assert set(acc.Tags()["images"]) == {"samples", "pair/0", "pair/1"}
    (image,) = acc.Images("pair/1")
    decoded = np.asarray(Image.open(io.BytesIO(image.encoded_image_string)))
    np.testing.assert_array_equal(decoded, (np.arange(12, 24, dtype=np.uint8) * 10).reshape(3, 4))
    plugin = acc.PluginTagToContent("hparams")
    assert "_hparams_/session_start_info" in plugin
