"""Host-side input: TFDS datasets by name, image folders and scikit-learn's bundled digits.

Images leave the host as uint8 NHWC batches; scaling to [-1, 1] and random flips happen on
device inside the train step, as in the original's `model_fn`, so they are functions of
(seed, step, example index) and a resumed run sees exactly the data it would have seen.

Two ways to feed a run:
* in memory (`data.in_memory=True`, the default): the whole split is decoded once into host
  RAM. The global batch of step s is rows `perm_e[(s mod E)·B : +B]` of the epoch-e permutation
  `perm_e = permutation(seed, e)`, and each process takes its contiguous slice of that batch.
  Data order is a pure function of the step; the processes' slices are disjoint and cover it.
* streaming (`data.in_memory=False`, for LSUN/CelebA-HQ size data): Grain reads a TFDS split
  stored as ArrayRecord, or an image folder, by index in a seeded per-epoch order, each process
  every P-th example of it. The data position is each process's Grain iterator state, saved in
  every checkpoint, so a resumed run goes on with the very next example.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Iterator
from typing import NamedTuple

import numpy as np
from absl import logging

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


class Dataset(NamedTuple):
    images: np.ndarray  # uint8 [N, H, W, C]
    labels: np.ndarray  # int32 [N]; zeros when the source has none
    num_classes: int


# ---------------------------------------------------------------------------------------------
# Image preprocessing shared by every source.


def center_crop_resize(image: np.ndarray, size: int) -> np.ndarray:
    """Centre-crops an HWC uint8 image to a square and resizes it to size x size (antialiased)."""
    from PIL import Image

    height, width = image.shape[:2]
    if (height, width) == (size, size):
        return image
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    square = image[top:top + side, left:left + side]
    channels = square.shape[2]
    pil = Image.fromarray(square[..., 0] if channels == 1 else square)
    resample = Image.Resampling.BICUBIC if side < size else Image.Resampling.LANCZOS
    out = np.asarray(pil.resize((size, size), resample=resample))
    return out.reshape(size, size, channels)


def _to_channels(image: np.ndarray, channels: int) -> np.ndarray:
    if image.ndim == 2:
        image = image[..., None]
    if image.shape[2] == channels:
        return image
    if channels == 3 and image.shape[2] == 1:
        return np.repeat(image, 3, axis=2)
    if channels == 3 and image.shape[2] == 4:
        return image[..., :3]
    if channels == 1:
        rgb = image[..., :3].astype(np.float64)
        gray = rgb @ np.array([0.299, 0.587, 0.114])
        return np.clip(np.round(gray), 0, 255).astype(np.uint8)[..., None]
    raise ValueError(f"cannot convert an image with {image.shape[2]} channels to {channels}")


# ---------------------------------------------------------------------------------------------
# Sources.


def load_digits(image_size: int, channels: int) -> Dataset:
    """scikit-learn's bundled 8x8 digits (1,797 images, 0..16 grey levels) as uint8 images."""
    from sklearn.datasets import load_digits as sk_load_digits

    digits = sk_load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    images = np.stack([_to_channels(center_crop_resize(im, image_size), channels)
                       for im in images])
    return Dataset(images, digits.target.astype(np.int32), 10)


def _is_hidden(name: str) -> bool:
    """.DS_Store, macOS `._x.png` resource forks, .ipynb_checkpoints, .git, ..."""
    return name.startswith(".")


def list_image_files(folder: str) -> list[str]:
    """Every real image file below `folder` once, sorted by path (empty if there is none).

    Suffixes are IMAGE_SUFFIXES in any case (.PNG, .JPG). Hidden files and folders are skipped.
    Symbolic links are followed, but each real directory is walked once (a link to an ancestor
    would loop) and a file reached by several paths (links, links to outside the tree) counts
    once: under its own path when it lies in the tree, else under its first path in sorted
    order."""
    candidates: list[str] = []
    walked: set[str] = set()
    for root, dirs, files in os.walk(folder, followlinks=True):
        real_root = os.path.realpath(root)
        if real_root in walked:
            dirs[:] = []
            continue
        walked.add(real_root)
        dirs[:] = sorted(d for d in dirs if not _is_hidden(d))
        candidates.extend(os.path.join(root, f) for f in files
                          if not _is_hidden(f) and f.lower().endswith(IMAGE_SUFFIXES))
    real_folder = os.path.realpath(folder)

    def through_links(path: str) -> bool:
        return os.path.realpath(path) != os.path.join(real_folder, os.path.relpath(path, folder))

    # Of the paths to one file, the one without links below `folder` (its own class), else the
    # first in sorted order. A broken link stays in, to be reported as unreadable.
    chosen: dict[str, str] = {}
    for path in sorted(candidates, key=lambda p: (through_links(p), p)):
        chosen.setdefault(os.path.realpath(path), path)
    paths = sorted(chosen.values())
    if len(paths) < len(candidates):
        logging.info("image folder %s: %d paths lead to files already listed (links); each "
                     "file is used once", folder, len(candidates) - len(paths))
    return paths


def list_image_folder(folder: str) -> tuple[list[str], list[int], list[str]]:
    """`list_image_files(folder)`, with labels from the first-level subfolder (sorted)."""
    if not os.path.isdir(folder):
        raise ValueError(f"data.folder={folder!r} is not a directory; "
                         "set --config.data.folder to a folder of PNG/JPEG images.")
    paths = list_image_files(folder)
    if not paths:
        raise ValueError(f"data.folder={folder!r} has no images ({', '.join(IMAGE_SUFFIXES)}); "
                         "point --config.data.folder at a folder that has some.")
    classes = sorted({os.path.relpath(p, folder).split(os.sep)[0] for p in paths
                      if os.sep in os.path.relpath(p, folder)})
    index = {name: i for i, name in enumerate(classes)}
    labels = [index.get(os.path.relpath(p, folder).split(os.sep)[0], 0) for p in paths]
    return paths, labels, classes


def _to_8_bit(pil) -> "Image.Image":
    """Integer and float modes as 8 bits: 16-bit (I;16*, and I, which 16-bit files decode to)
    as round(v / 257), so 0..65535 maps onto 0..255 with 257·k → k; floats (F) in [0, 1] as
    round(255 v). Values outside those ranges are an error rather than a guess."""
    from PIL import Image

    values = np.asarray(pil)
    if pil.mode == "F":
        if not (np.isfinite(values).all() and values.min() >= 0 and values.max() <= 1):
            raise ValueError(f"a float (mode F) image must hold values in [0, 1], this one has "
                             f"{np.nanmin(values):g}..{np.nanmax(values):g}")
        return Image.fromarray(np.round(values.astype(np.float64) * 255).astype(np.uint8))
    values = values.astype(np.int64)
    if values.min() < 0 or values.max() > 65535:
        raise ValueError(f"a mode {pil.mode} image must hold 16-bit values 0..65535, this one "
                         f"has {values.min()}..{values.max()}")
    return Image.fromarray(((values + 128) // 257).astype(np.uint8))  # = round(v / 257)


def read_image(path: str, channels: int) -> np.ndarray:
    """uint8 [H, W, channels] from an image file, upright (EXIF orientation applied).

    8-bit from any mode: 16-bit and float per `_to_8_bit`; transparency (RGBA, LA, PA, P or
    L/RGB with a transparent colour) composited on white, as a viewer shows it on a page;
    1-bit, palette, CMYK, YCbCr etc. through Pillow. channels = 1 takes colour as ITU-R 601
    luma (Pillow's L); channels = 3 repeats grey."""
    from PIL import Image, ImageOps

    with Image.open(path) as opened:
        pil = ImageOps.exif_transpose(opened)
        pil.load()
    if pil.mode.startswith("I") or pil.mode == "F":
        pil = _to_8_bit(pil)
    if pil.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in pil.info:
        rgba = pil.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        pil = Image.alpha_composite(white, rgba)
    image = np.asarray(pil.convert("L" if channels == 1 else "RGB"))
    return image.reshape(image.shape[0], image.shape[1], channels)


NPZ_IMAGES_KEY = "images"


def load_npz_images(path: str, source: str) -> np.ndarray:
    """uint8 [N, H, W, C] with C = 1 or 3 from an npz (numpy.savez): its array `images`, else
    its first array. [H, W, C] is one image, [N, H, W] grey images. `source` names the file in
    the one-line ValueError of a file that does not hold such images (e.g. "sample.input='x.npz'")."""
    try:
        with np.load(path, allow_pickle=False) as data:
            keys = list(data.files)
            key = NPZ_IMAGES_KEY if NPZ_IMAGES_KEY in keys else (keys[0] if keys else None)
            images = None if key is None else np.asarray(data[key])
    except Exception as e:  # empty (EOFError), truncated (BadZipFile), corrupt members, not an npz
        raise ValueError(f"cannot read {source} as .npz ({type(e).__name__}: {e}); the file is "
                         "empty, truncated or not an .npz, write it again with numpy.savez."
                         ) from e
    if key is None:
        raise ValueError(f"{source} holds no arrays")
    if images.dtype != np.uint8:
        raise ValueError(f"{source}['{key}'] has dtype {images.dtype}, expected uint8 images")
    if images.ndim == 3:
        images = images[None] if images.shape[-1] in (1, 3) else images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"{source}['{key}'] has shape {images.shape}, expected uint8 images "
                         "[N, H, W, C] with 1 or 3 channels")
    return images


MAX_LISTED_FILES = 3


def unreadable_files_error(what: str, failures: list[tuple[str, str]]) -> ValueError:
    """One line naming how many files failed and the first few, each with its reason."""
    shown = "; ".join(f"{path!r} ({reason})" for path, reason in failures[:MAX_LISTED_FILES])
    more = len(failures) - MAX_LISTED_FILES
    return ValueError(f"{len(failures)} file(s) in {what} cannot be read as images: {shown}"
                      f"{f'; and {more} more' if more > 0 else ''}; remove or fix them.")


def load_image_folder(folder: str, image_size: int, channels: int) -> Dataset:
    paths, labels, classes = list_image_folder(folder)
    images, failures, upscaled = [], [], 0
    for path in paths:
        try:
            image = read_image(path, channels)
        except Exception as e:  # every broken file is named, not only the first
            reason = " ".join(str(e).split()) or type(e).__name__
            failures.append((path, reason[:200]))
            continue
        upscaled += min(image.shape[:2]) < image_size
        images.append(_to_channels(center_crop_resize(image, image_size), channels))
    if failures:
        raise unreadable_files_error(f"data.folder={folder!r}", failures)
    if upscaled:
        logging.warning("image folder %s: %d of %d images are smaller than data.image_size=%d "
                        "and were upscaled (blurry); use larger images or a smaller "
                        "data.image_size", folder, upscaled, len(images), image_size)
    logging.info("image folder %s: %d images, %d classes", folder, len(images), len(classes))
    return Dataset(np.stack(images), np.asarray(labels, np.int32), max(len(classes), 1))


def _tfds_builder(name: str, data_dir: str):
    import tensorflow_datasets as tfds

    try:
        builder = tfds.builder(name, data_dir=data_dir or None)
    except Exception as e:
        raise ValueError(f"unknown dataset data.name={name!r} ({type(e).__name__}); use a TFDS "
                         "name (e.g. cifar10, mnist), 'digits' or 'imagefolder'.") from e
    return builder


def load_tfds(name: str, split: str, image_size: int, channels: int, data_dir: str = "") -> Dataset:
    """A whole TFDS split in memory (prepares it on first use, like `tfds.load`)."""
    import tensorflow_datasets as tfds

    builder = _tfds_builder(name, data_dir)
    builder.download_and_prepare()
    ds = builder.as_dataset(split=split, shuffle_files=False)
    features = builder.info.features
    num_classes = getattr(features["label"], "num_classes", 1) if "label" in features else 1
    images, labels = [], []
    for example in tfds.as_numpy(ds):
        image = _to_channels(example["image"], channels)
        images.append(_to_channels(center_crop_resize(image, image_size), channels))
        labels.append(int(example.get("label", 0)))
    if not images:
        raise ValueError(f"TFDS {name}:{split} is empty; check --config.data.split.")
    return Dataset(np.stack(images), np.asarray(labels, np.int32), num_classes)


def load_dataset(data_config, split: str | None = None) -> Dataset:
    """The configured split, decoded into host memory."""
    split = split or data_config.split
    if data_config.name == "digits":
        return load_digits(data_config.image_size, data_config.channels)
    if data_config.name == "imagefolder":
        return load_image_folder(data_config.folder, data_config.image_size, data_config.channels)
    return load_tfds(data_config.name, split, data_config.image_size, data_config.channels,
                     data_config.data_dir)


# ---------------------------------------------------------------------------------------------
# Step-indexed batches (in memory).


def global_batch_indices(num_examples: int, global_batch: int, step: int, seed: int) -> np.ndarray:
    """Dataset rows of the global batch of `step`: epochs of a seeded permutation, no remainder."""
    steps_per_epoch = num_examples // global_batch
    if steps_per_epoch == 0:
        raise ValueError(f"the dataset has {num_examples} examples, fewer than one batch of "
                         f"{global_batch}; lower --config.training.batch_size.")
    epoch, within = divmod(step, steps_per_epoch)
    permutation = np.random.default_rng([seed, epoch]).permutation(num_examples)
    return permutation[within * global_batch:(within + 1) * global_batch]


class Batch(NamedTuple):
    images: np.ndarray  # uint8 [K, B_process, H, W, C]
    labels: np.ndarray  # int32 [K, B_process]
    position: bytes | None = None  # streaming: this process's data state after the batch


def in_memory_batches(dataset: Dataset, *, global_batch: int, steps_per_call: int,
                      start_step: int, seed: int, process_index: int = 0,
                      process_count: int = 1) -> Iterator[Batch]:
    """Yields this process's rows of `steps_per_call` consecutive global batches from `start_step`."""
    from ddpm_jax.parallel import host_batch_slice  # jax, which fid_stats --help need not load

    rows = host_batch_slice(global_batch, process_index, process_count)
    step = start_step
    while True:
        indices = np.stack([
            global_batch_indices(len(dataset.images), global_batch, step + k, seed)[rows]
            for k in range(steps_per_call)])
        yield Batch(dataset.images[indices], dataset.labels[indices])
        step += steps_per_call


# ---------------------------------------------------------------------------------------------
# Streaming (Grain): data too large for host RAM, read by index, resumable exactly.

GRAIN_MISSING = ("streaming data (data.in_memory=False) is read with Grain, which is not "
                 "installed: pip install grain (or pip install 'ddpm_jax[streaming]').")


def _import_grain():
    try:
        import grain
    except ImportError as e:
        raise ValueError(GRAIN_MISSING) from e
    return grain


class _FolderSource:
    """An image folder read by index (Grain's random-access source): (path, label) rows."""

    def __init__(self, folder: str):
        self.folder = folder
        self.paths, self.labels, _ = list_image_folder(folder)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict:
        return {"path": self.paths[index], "label": self.labels[index]}

    def __repr__(self) -> str:  # Grain checks a restored state against this
        return f"ImageFolder({self.folder!r}, {len(self.paths)} images)"


def _tfds_source(data_config):
    """This split as ArrayRecord read by index, images left encoded (decoded as tf.data did)."""
    import tensorflow_datasets as tfds

    builder = _tfds_builder(data_config.name, data_config.data_dir)
    try:
        source = builder.as_data_source(split=data_config.split,
                                        decoders={"image": tfds.decode.SkipDecoding()})
    except NotImplementedError as e:  # not prepared, or as TFRecord: no reading by index
        if not builder.is_prepared():
            raise ValueError(
                f"TFDS {data_config.name} is not prepared in {builder.data_dir}; prepare it "
                f"with `tfds build {data_config.name} --file_format=array_record"
                f"{f' --data_dir={data_config.data_dir}' if data_config.data_dir else ''}` or "
                "set --config.data.data_dir to where it is.") from e
        raise ValueError(
            f"TFDS {data_config.name} in {builder.data_dir} is stored as "
            f"{builder.info.file_format.value}, but streaming (data.in_memory=False) reads "
            f"ArrayRecord by index: convert it once with `tfds convert_format "
            f"--dataset_version_dir={builder.data_dir} --out_file_format=array_record` or "
            f"prepare it again with `tfds build {data_config.name} "
            "--file_format=array_record`.") from e
    return builder, source


def _tf_crop_resize(size: int, channels: int):
    """The TFDS streaming preprocessing (docs/deviations.md D7): channels, centre square,
    area resize with antialias, round, uint8; one graph for every image shape."""
    import tensorflow as tf

    @tf.function(input_signature=[tf.TensorSpec([None, None, None], tf.uint8)], autograph=False)
    def preprocess(image):
        if channels == 1:
            image = tf.cond(tf.shape(image)[-1] == 1, lambda: image,
                            lambda: tf.image.rgb_to_grayscale(image[..., :3]))
        else:
            image = tf.cond(tf.shape(image)[-1] == 1, lambda: tf.image.grayscale_to_rgb(image),
                            lambda: image[..., :3])
        height, width = tf.shape(image)[0], tf.shape(image)[1]
        side = tf.minimum(height, width)
        image = tf.image.crop_to_bounding_box(image, (height - side) // 2, (width - side) // 2,
                                              side, side)
        image = tf.image.resize(image, [size, size], method="area", antialias=True)
        return tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)

    return preprocess


class Stream(NamedTuple):
    """Streaming data opened for reading: a random-access source and its preprocessing."""
    source: object  # Grain's RandomAccessDataSource: len() and [index]
    to_example: object  # source row -> (uint8 [H, W, C] image, int32 label)


def open_stream(data_config) -> Stream:
    """The configured TFDS split (ArrayRecord) or image folder, opened for streaming; a
    one-line ValueError if it cannot be (no Grain, TFRecord files, no such folder)."""
    _import_grain()
    size, channels = data_config.image_size, data_config.channels
    if data_config.name == "imagefolder":
        def from_file(row):
            try:
                image = read_image(row["path"], channels)
            except Exception as e:  # named like load_image_folder names it
                reason = " ".join(str(e).split()) or type(e).__name__
                raise unreadable_files_error(f"data.folder={data_config.folder!r}",
                                             [(row["path"], reason[:200])]) from e
            image = _to_channels(center_crop_resize(image, size), channels)
            return image, np.int32(row["label"])

        return Stream(_FolderSource(data_config.folder), from_file)

    import tensorflow as tf

    tf.config.set_visible_devices([], "GPU")
    builder, source = _tfds_source(data_config)
    decode, preprocess = builder.info.features["image"], _tf_crop_resize(size, channels)

    def from_tfds(example):
        image = example["image"]
        if isinstance(image, bytes):  # as tf.data decoded it: the feature's own TF decoder
            image = decode.decode_example(tf.constant(image))
        image = preprocess(tf.convert_to_tensor(image, tf.uint8)).numpy()
        return image, np.int32(example.get("label", 0))

    return Stream(source, from_tfds)


class _Preprocessed:
    """`stream.source` with its preprocessing done on read, so that it runs in Grain's reader
    threads (ReadOptions: 16, reading ahead), in parallel, as tf.data's map did."""

    def __init__(self, stream: Stream):
        self.stream = stream

    def __len__(self) -> int:
        return len(self.stream.source)

    def __getitem__(self, index: int):
        return self.stream.to_example(self.stream.source[index])

    def __repr__(self) -> str:  # Grain checks a restored state against this
        return repr(self.stream.source)


def streaming_batches(stream: Stream, *, global_batch: int, steps_per_call: int, seed: int,
                      position: bytes | None = None) -> Iterator[Batch]:
    """Grain over a TFDS split (ArrayRecord) or an image folder, for data too large for RAM.

    Epoch e is a permutation of the whole source drawn from (seed, e) and the stream runs on
    through the epochs; process p of P reads positions p, p + P, p + 2P, ... of it, so global
    step s holds positions [s·B, (s+1)·B) on any number of processes. Each batch carries
    `position`, this process's Grain iterator state after it: restored from a checkpoint, the
    stream goes on with the next example, exactly as without the interruption."""
    import jax

    grain = _import_grain()
    sampler = grain.samplers.IndexSampler(num_records=len(stream.source), shuffle=True,
                                          seed=seed, num_epochs=None)
    loader = grain.DataLoader(
        data_source=_Preprocessed(stream), sampler=sampler,
        operations=[grain.transforms.Batch(global_batch // jax.process_count(),
                                           drop_remainder=True)],
        shard_options=grain.sharding.ShardByJaxProcess(drop_remainder=True), worker_count=0)
    iterator = iter(loader)
    if position is not None:
        try:
            iterator.set_state(position)
        except ValueError as e:  # Grain: saved with another sampler (seed, size) or source
            logging.warning("the saved data position belongs to another data order (%s): the "
                            "data stream starts from its beginning", str(e).splitlines()[0])
            iterator = iter(loader)
    while True:
        calls = [next(iterator) for _ in range(steps_per_call)]
        yield Batch(np.stack([c[0] for c in calls]), np.stack([c[1] for c in calls]),
                    iterator.get_state())


def prefetch(iterator: Iterator, size: int) -> Iterator:
    """Runs `iterator` in a background thread, keeping `size` items ready."""
    if size <= 0:
        yield from iterator
        return
    items: queue.Queue = queue.Queue(maxsize=size)
    sentinel = object()

    def produce():
        try:
            for item in iterator:
                items.put(item)
        except BaseException as e:  # re-raised in the consumer
            items.put(e)
        items.put(sentinel)

    threading.Thread(target=produce, daemon=True).start()
    while True:
        item = items.get()
        if item is sentinel:
            return
        if isinstance(item, BaseException):
            raise item
        yield item
