"""Helpers that once had several copies (issue #15): each rule in one place, checked against
closed forms, and the callers that used to differ (data.folder, fid_stats, the editing tasks)
now giving the same answers."""

import os

import ml_collections
import numpy as np
import pytest
from PIL import Image

from ddpm_jax import checkpointing, edit_mode, fid_stats, input_pipeline, parallel, utilisation


@pytest.mark.parametrize("seconds, text", [
    (0, "0m00s"), (-5, "0m00s"), (59.9, "0m59s"), (61, "1m01s"), (3599, "59m59s"),
    (3600, "1h00m"), (7380, "2h03m"), (100 * 3600 + 59, "100h00m")])
def test_format_seconds(seconds, text):
    assert utilisation.format_seconds(seconds) == text


def test_host_batch_slice_splits_a_batch_into_contiguous_disjoint_parts():
    for batch, count in ((16, 1), (16, 2), (24, 4), (8, 8)):
        parts = [parallel.host_batch_slice(batch, index, count) for index in range(count)]
        rows = [list(range(batch))[part] for part in parts]
        assert rows == [list(range(i * batch // count, (i + 1) * batch // count))
                        for i in range(count)]
    assert parallel.host_batch_slice(16) == slice(0, 16)  # this single-process run: every row


def test_flatten_config_gives_dotted_leaves_of_a_configdict_and_of_its_json():
    config = ml_collections.ConfigDict(
        {"seed": 3, "model": {"ch": 32, "ch_mult": (1, 2), "deep": {"x": "y"}}, "empty": {}})
    expected = {"seed": 3, "model.ch": 32, "model.ch_mult": (1, 2), "model.deep.x": "y"}
    assert checkpointing.flatten_config(config) == expected
    import json

    as_json = json.loads(config.to_json_best_effort())
    assert checkpointing.flatten_config(as_json) == {**expected, "model.ch_mult": [1, 2]}


# ------------------------------------------------------------------ listing and reading images


def _save(path, array, **kwargs):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array).save(path, **kwargs)


def test_fid_stats_lists_a_folder_like_data_folder(tmp_path):
    root = tmp_path / "images"
    grey = np.full((4, 4), 9, np.uint8)
    for name in ("a.png", "sub/b.PNG", "c.bmp", "d.tiff", ".hidden.png", "._a.png",
                 ".ipynb_checkpoints/e.png", "notes.txt"):
        if name.endswith("txt"):
            (root / name).write_text("no image")
        else:
            _save(root / name, grey)
    os.symlink(root / "a.png", root / "a_again.png")  # the same file once
    batches, total = fid_stats._image_source(root, batch_size=10)
    assert total == 4 and sum(len(b) for b in batches) == 4
    expected = [str(root / n) for n in ("a.png", "c.bmp", "d.tiff", "sub/b.PNG")]
    assert input_pipeline.list_image_files(str(root)) == expected
    assert input_pipeline.list_image_folder(str(root))[0] == expected


def test_fid_stats_reads_16_bit_and_transparent_images_like_data_folder(tmp_path):
    values = np.array([[0, 257, 128, 129], [385, 65535, 32896, 65407]], np.uint16)
    _save(tmp_path / "deep.png", values)
    with Image.open(tmp_path / "deep.png") as check:
        assert check.mode.startswith("I")  # a 16-bit file indeed
    got = fid_stats.read_image(str(tmp_path / "deep.png"))
    # round(v / 257): 257·k → k, 128 → 0 (0.498), 129 → 1 (0.502), 385 → 1 (1.498)
    expected = np.array([[0, 1, 0, 1], [1, 255, 128, 255]], np.uint8)
    np.testing.assert_array_equal(got, np.repeat(expected[..., None], 3, axis=-1))

    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[0, 0, 3] = 255  # one opaque red pixel; the rest fully transparent: white
    _save(tmp_path / "clear.png", rgba)
    got = fid_stats.read_image(str(tmp_path / "clear.png"))
    np.testing.assert_array_equal(got[0, 0], [200, 0, 0])
    np.testing.assert_array_equal(got[1, 1], [255, 255, 255])


def test_one_npz_loader_for_the_tasks_and_fid_stats(tmp_path):
    stack = np.arange(2 * 8 * 8, dtype=np.uint8).reshape(2, 8, 8, 1)
    other = np.zeros((3, 8, 8, 1), np.uint8)
    np.savez(tmp_path / "keyed.npz", first=other, images=stack)  # `images` wins over order
    np.savez(tmp_path / "unkeyed.npz", pictures=stack, more=other)  # else the first array
    np.savez(tmp_path / "grey.npz", images=stack[..., 0])  # [N, H, W]: grey images
    np.savez(tmp_path / "one.npz", images=stack[0])  # [H, W, C]: one image
    for name, expected in (("unkeyed", stack), ("keyed", stack), ("grey", stack),
                           ("one", stack[:1])):
        path = str(tmp_path / f"{name}.npz")
        np.testing.assert_array_equal(edit_mode.load_images(path, 8, 1), expected)
        np.testing.assert_array_equal(input_pipeline.load_npz_images(path, path), expected)
        batches, total = fid_stats._image_source(tmp_path / f"{name}.npz", 10)
        assert total == len(expected)
        np.testing.assert_array_equal(np.concatenate(list(batches)), expected)

    np.savez(tmp_path / "floats.npz", images=stack.astype(np.float32))
    np.savez(tmp_path / "nothing.npz")
    np.savez(tmp_path / "rgba.npz", images=np.zeros((1, 8, 8, 4), np.uint8))
    (tmp_path / "empty.npz").write_bytes(b"")
    cases = [
        ("floats.npz", "['images'] has dtype float32, expected uint8 images"),
        ("nothing.npz", " holds no arrays"),
        ("rgba.npz", "['images'] has shape (1, 8, 8, 4), expected uint8 images [N, H, W, C] "
                     "with 1 or 3 channels"),
        ("empty.npz", " as .npz (EOFError: No data left in file); the file is empty, "
                      "truncated or not an .npz, write it again with numpy.savez."),
    ]
    for name, tail in cases:
        path = str(tmp_path / name)
        with pytest.raises(ValueError) as raised:
            edit_mode.load_images(path, 8, 1)
        prefix = "cannot read " if "EOFError" in tail else ""
        assert str(raised.value) == f"{prefix}sample.input={path!r}{tail}"
        if name != "empty.npz":  # fid_stats names a file that is no zip at all itself
            with pytest.raises(ValueError) as raised:
                fid_stats._image_source(tmp_path / name, 10)
            assert str(raised.value) == f"{prefix}{path}{tail}"


# ------------------------------------------------------------------ config rules in validate.py


def test_validate_owns_the_rules_the_modes_checked_themselves():
    from configs import default
    from ddpm_jax import validate

    mesh = parallel.make_mesh()
    config = default.get_config()
    config.eval.num_samples, config.eval.bpd = 0, False  # was evaluate.validate_config's
    with pytest.raises(ValueError, match=r"^nothing to evaluate: eval.num_samples=0 and "):
        validate.validate(config, "eval", mesh)
    config.eval.num_samples, config.eval.is_splits = 8, 10
    with pytest.raises(ValueError, match=r"^eval.num_samples=8 is too few for eval.is_splits=10"):
        validate.validate(config, "eval", mesh)

    config = default.get_config()  # was make_device_step's
    config.data.name, config.model.num_classes, config.model.class_dropout = "digits", 10, 1.0
    with pytest.raises(ValueError, match=r"^model.class_dropout=1.0 must be in \[0, 1\) for a "
                                         r"conditional model"):
        validate.validate(config, "train", mesh)
    config.model.num_classes = 0  # unconditional: the label dropout is not used
    validate.validate(config, "train", mesh)
    config.training.steps_per_call = 0  # was train.validate_config's
    with pytest.raises(ValueError, match=r"^training.steps_per_call=0 must be ≥ 1; set "):
        validate.check_training_run(config, mesh)
