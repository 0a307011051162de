"""TensorBoard event files without TensorFlow: scalars, images and hyperparameters.

Written with the `tensorboard` package's own event-file writer (the one PyTorch's writer uses),
in the layout TensorFlow's `tf.summary` gives (scalars as float tensors of the `scalars` plugin,
images as PNGs), so a host with only the JAX stack logs the same events TensorBoard reads.
Only process 0 writes; the others create no file.
"""

from __future__ import annotations

import io
import time
from typing import Any, Mapping

import numpy as np
from PIL import Image
from tensorboard.compat.proto import event_pb2, summary_pb2, tensor_pb2, types_pb2
from tensorboard.compat.proto.tensor_shape_pb2 import TensorShapeProto
from tensorboard.plugins.hparams import summary_v2 as hparams_summary
from tensorboard.summary.writer.event_file_writer import EventFileWriter

_SCALARS = summary_pb2.SummaryMetadata(
    plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars"))


def _scalar_value(tag: str, value: float) -> summary_pb2.Summary.Value:
    tensor = tensor_pb2.TensorProto(dtype=types_pb2.DT_FLOAT, float_val=[float(value)],
                                    tensor_shape=TensorShapeProto())
    return summary_pb2.Summary.Value(tag=tag, tensor=tensor, metadata=_SCALARS)


def _png(image: np.ndarray) -> bytes:
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"images are written as uint8, got {image.dtype}")
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def _image_value(tag: str, image: np.ndarray) -> summary_pb2.Summary.Value:
    height, width = image.shape[:2]
    channels = image.shape[2] if image.ndim == 3 else 1
    return summary_pb2.Summary.Value(tag=tag, image=summary_pb2.Summary.Image(
        height=height, width=width, colorspace=channels, encoded_image_string=_png(image)))


class SummaryWriter:
    """`write_scalars`, `write_images` and `write_hparams` into `logdir`'s event file."""

    def __init__(self, logdir: str, *, enabled: bool = True):
        self._writer = EventFileWriter(logdir) if enabled else None

    @property
    def enabled(self) -> bool:
        return self._writer is not None

    def _add(self, step: int, values: list[summary_pb2.Summary.Value]) -> None:
        if self._writer is not None and values:
            self._writer.add_event(event_pb2.Event(
                step=int(step), wall_time=time.time(), summary=summary_pb2.Summary(value=values)))

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        self._add(step, [_scalar_value(tag, value) for tag, value in scalars.items()])

    def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
        """Each entry is one image [H, W, C] or a batch [N, H, W, C] (tags `name/i` for N > 1)."""
        values = []
        for tag, array in images.items():
            array = np.asarray(array)
            batch = array if array.ndim == 4 else array[None]
            for index, image in enumerate(batch):
                values.append(_image_value(tag if len(batch) == 1 else f"{tag}/{index}", image))
        self._add(step, values)

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        """Hyperparameters for TensorBoard's HPARAMS tab (bool, number or string values)."""
        if self._writer is None:
            return
        plain = {key: value if isinstance(value, (bool, int, float, str)) else str(value)
                 for key, value in hparams.items()}
        summary = hparams_summary.hparams_pb(plain)
        self._writer.add_event(event_pb2.Event(step=0, wall_time=time.time(), summary=summary))

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

