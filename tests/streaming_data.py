"""Small TFDS datasets for the streaming tests, prepared on the fly (no download).

`indexed_images`: example i is an 8×8 grey image whose first two pixels spell i (i mod 256,
i div 256) and whose label is i, so a batch tells which examples it holds.
`sized_photos`: RGB JPEGs of varying sizes and aspect ratios (label = index), for comparing
preprocessing pixel for pixel.
"""

import numpy as np
import tensorflow_datasets as tfds

NUM_INDEXED = 40
NUM_PHOTOS = 12


def id_image(index: int) -> np.ndarray:
    image = ((np.arange(64) * 37 + index * 11) % 256).astype(np.uint8).reshape(8, 8, 1)
    image[0, 0, 0], image[0, 1, 0] = index % 256, index // 256
    return image


def image_ids(images: np.ndarray) -> np.ndarray:
    """The example ids of uint8 [..., 8, 8, 1] images made by `id_image`."""
    return images[..., 0, 0, 0].astype(np.int64) + 256 * images[..., 0, 1, 0].astype(np.int64)


class IndexedImages(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(8, 8, 1)),
            "label": tfds.features.ClassLabel(num_classes=NUM_INDEXED)}))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        for i in range(NUM_INDEXED):
            yield i, {"image": id_image(i), "label": i}


class SizedPhotos(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
            "label": tfds.features.ClassLabel(num_classes=NUM_PHOTOS)}))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        rng = np.random.default_rng(0)
        for i in range(NUM_PHOTOS):
            height, width = 9 + 5 * (i % 4), 7 + 6 * (i % 3)  # smaller and larger than 16
            smooth = np.linspace(0, 255, height * width * 3).reshape(height, width, 3)
            noise = rng.integers(-40, 40, (height, width, 3))
            yield i, {"image": np.clip(smooth + noise, 0, 255).astype(np.uint8), "label": i}


def prepare(name: str, data_dir: str, file_format: str = "array_record") -> str:
    tfds.builder(name, data_dir=data_dir, file_format=file_format).download_and_prepare()
    return data_dir
