"""Image folders (issue #13, 1.3): each real file once (symlink loops, links, hidden files),
every Pillow mode to correct 8-bit values, a warning for upscaled small images and one error
naming all unreadable files."""

import logging
import os

import numpy as np
import pytest
from PIL import Image

from ddpm_jax import input_pipeline


def _png(path, array, **kwargs):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.asarray(array)).save(path, **kwargs)
    return str(path)


def _grey(value, size=8):
    return np.full((size, size), value, np.uint8)


def _load_one(path, channels):
    """The one image of `path`'s folder as the image-folder loader gives it, at its own size."""
    with Image.open(path) as image:
        size = min(image.size)
    return input_pipeline.load_image_folder(os.path.dirname(path), size, channels).images[0]


def test_each_real_file_is_loaded_once(tmp_path):
    root = tmp_path / "data"
    for i in range(10):
        _png(root / "dogs" / f"d{i}.png", _grey(10 + i))
    _png(root / "cats" / "c0.png", _grey(100))
    _png(root / "cats" / "C1.PNG", _grey(101))  # upper-case suffix: an image too
    os.symlink(".", root / "dogs" / "loop")  # dogs/loop/loop/... : 10 images became 130
    os.symlink(root / "dogs" / "d0.png", root / "cats" / "same_as_d0.png")
    os.symlink(root / "dogs" / "d1.png", root / "dogs" / "d1_again.png")
    outside = _png(tmp_path / "elsewhere" / "o.png", _grey(200))
    os.symlink(outside, root / "cats" / "outside.png")
    os.symlink(outside, root / "dogs" / "outside_again.png")
    os.symlink(tmp_path / "elsewhere", root / "dogs" / "elsewhere_dir")

    dataset = input_pipeline.load_image_folder(str(root), 8, 1)
    values = sorted(int(v) for v in dataset.images[:, 0, 0, 0])
    assert values == sorted([10 + i for i in range(10)] + [100, 101, 200])
    paths, _, classes = input_pipeline.list_image_folder(str(root))
    assert classes == ["cats", "dogs"] and len(paths) == 13
    # A file reached by several paths counts under its own path (dogs/d0.png, not the link
    # cats/same_as_d0.png), one outside the tree under its first path: cats/outside.png.
    label_of = dict(zip(dataset.images[:, 0, 0, 0].tolist(), dataset.labels.tolist()))
    assert label_of[10] == 1 and label_of[11] == 1 and label_of[200] == 0


def test_hidden_files_and_folders_are_skipped(tmp_path):
    root = tmp_path / "data"
    _png(root / "dogs" / "d0.png", _grey(10))
    # A notebook's checkpoint copy, a macOS resource fork, Finder's metadata.
    _png(root / "dogs" / ".ipynb_checkpoints" / "d0-checkpoint.png", _grey(250))
    (root / "dogs" / "._d0.png").write_bytes(b"\x00\x05\x16\x07 resource fork")
    (root / ".DS_Store").write_bytes(b"Bud1")
    dataset = input_pipeline.load_image_folder(str(root), 8, 1)
    assert dataset.images[:, 0, 0, 0].tolist() == [10]


def test_16_bit_png_is_scaled_to_8_bits_as_round_v_over_257(tmp_path):
    values = np.concatenate([np.arange(0, 65536, 257), [128, 129, 385, 386, 65407, 65408, 65535]])
    rng = np.random.default_rng(0)
    values = np.concatenate([values, rng.integers(0, 65536, 24 * 24 - len(values))])
    values = values.astype(np.uint16).reshape(24, 24)
    path = _png(tmp_path / "g" / "gradient16.png", values)
    assert Image.open(path).mode == "I;16"
    expected = np.round(values.astype(np.float64) / 257.0)  # 257·k ↦ k, 65535 ↦ 255
    dataset = input_pipeline.load_image_folder(str(tmp_path / "g"), 24, 1)
    np.testing.assert_array_equal(dataset.images[0, ..., 0], expected)
    rgb = input_pipeline.load_image_folder(str(tmp_path / "g"), 24, 3)
    np.testing.assert_array_equal(rgb.images[0], np.repeat(expected[..., None], 3, axis=2))


def test_float_one_bit_cmyk_and_colour_to_grey(tmp_path):
    floats = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    os.makedirs(tmp_path / "f")
    Image.fromarray(floats, mode="F").save(tmp_path / "f" / "f.tiff")
    np.testing.assert_array_equal(_load_one(tmp_path / "f" / "f.tiff", 1)[..., 0],
                                  np.round(floats.astype(np.float64) * 255))
    Image.fromarray(floats * 300, mode="F").save(tmp_path / "f" / "f.tiff")
    with pytest.raises(ValueError, match=r"values in \[0, 1\], this one has 0..300"):
        _load_one(tmp_path / "f" / "f.tiff", 1)

    bits = np.indices((8, 8)).sum(0) % 2 == 0
    os.makedirs(tmp_path / "b")
    Image.fromarray(bits).convert("1").save(tmp_path / "b" / "b.png")
    np.testing.assert_array_equal(_load_one(tmp_path / "b" / "b.png", 1)[..., 0],
                                  np.where(bits, 255, 0))

    os.makedirs(tmp_path / "c")
    Image.new("CMYK", (8, 8), (255, 0, 0, 0)).save(tmp_path / "c" / "c.tiff")  # cyan ink
    np.testing.assert_array_equal(_load_one(tmp_path / "c" / "c.tiff", 3),
                                  np.broadcast_to([0, 255, 255], (8, 8, 3)))

    red = _png(tmp_path / "red" / "red.png", np.broadcast_to(np.uint8([255, 0, 0]), (8, 8, 3)))
    # data.channels = 1 takes the ITU-R 601 luma 0.299 R + 0.587 G + 0.114 B.
    np.testing.assert_array_equal(_load_one(red, 1), round(0.299 * 255))


def test_transparency_is_composited_on_white(tmp_path):
    alpha = np.linspace(0, 255, 64).round().astype(np.uint8).reshape(8, 8)
    colour = np.uint8([200, 40, 0])
    path = _png(tmp_path / "rgba" / "rgba.png",
                np.dstack([np.broadcast_to(colour, (8, 8, 3)), alpha]))
    a = alpha.astype(np.float64)[..., None] / 255
    np.testing.assert_allclose(_load_one(path, 3), colour * a + 255 * (1 - a), atol=0.5 + 1e-9)

    palette = Image.new("P", (8, 8), 0)
    palette.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    palette.paste(1, (4, 0, 8, 8))  # right half: opaque blue; left half: transparent red
    os.makedirs(tmp_path / "p")
    palette.save(tmp_path / "p" / "p.png", transparency=0)
    got = _load_one(tmp_path / "p" / "p.png", 3)
    np.testing.assert_array_equal(got[:, :4], 255)
    np.testing.assert_array_equal(got[:, 4:], np.broadcast_to([0, 0, 255], (8, 4, 3)))

    os.makedirs(tmp_path / "la")
    Image.fromarray(np.zeros((8, 8, 2), np.uint8), mode="LA").save(tmp_path / "la" / "la.png")
    np.testing.assert_array_equal(_load_one(tmp_path / "la" / "la.png", 1), 255)  # all clear


def test_exif_rotation_is_applied(tmp_path):
    stored = np.zeros((8, 16), np.uint8)
    stored[:, 8:] = 255  # left half black, right half white
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to display
    os.makedirs(tmp_path / "r")
    Image.fromarray(stored).save(tmp_path / "r" / "r.jpg", exif=exif, quality=100)
    upright = input_pipeline.load_image_folder(str(tmp_path / "r"), 8, 1).images[0, ..., 0]
    # Rotated clockwise to 16x8, the stored left (black) half is on top; the centre crop keeps
    # rows 4..11, so the top four rows are black and the bottom four white.
    assert upright[:3].max() < 30 and upright[5:].min() > 225


def test_small_images_are_counted_in_a_warning(tmp_path, caplog):
    for i in range(3):
        _png(tmp_path / "d" / f"small{i}.png", _grey(50, size=4))
    for i in range(2):
        _png(tmp_path / "d" / f"big{i}.png", _grey(50, size=16))
    _png(tmp_path / "d" / "wide.png", np.full((6, 20), 50, np.uint8))  # shorter side 6 < 8
    with caplog.at_level(logging.WARNING):
        dataset = input_pipeline.load_image_folder(str(tmp_path / "d"), 8, 1)
    assert dataset.images.shape == (6, 8, 8, 1)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "4 of 6 images are smaller than data.image_size=8 and were upscaled" in warnings[0]


def test_all_unreadable_files_in_one_error(tmp_path):
    root = tmp_path / "broken"
    _png(root / "good.png", _grey(1))
    good_bytes = (root / "good.png").read_bytes()
    (root / "a_text.png").write_text("not an image")
    (root / "b_truncated.png").write_bytes(good_bytes[:len(good_bytes) // 2])
    (root / "c_empty.jpg").write_bytes(b"")
    os.symlink(tmp_path / "gone.png", root / "d_dangling.png")
    (root / "e_text.JPG").write_text("neither")
    with pytest.raises(ValueError) as error:
        input_pipeline.load_image_folder(str(root), 8, 1)
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(f"5 file(s) in data.folder='{root}' cannot be read as images: ")
    for name in ("a_text.png", "b_truncated.png", "c_empty.jpg"):
        assert os.path.join(str(root), name) in message
    assert "d_dangling" not in message and message.endswith("; and 2 more; remove or fix them.")
