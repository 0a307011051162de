"""LSUN church_outdoor 256x256 (docs/original.md §7): the 113,673,219-parameter model, 1_200_000 steps.

Data: TFDS `lsun/church_outdoor` (images centre-cropped and resized to 256x256), streamed.
lr 2e-5, batch 64, dropout 0, fixedsmall variance. Flips: flips on, as paper and script agree.
"""

from configs import celebahq256


def get_config():
    config = celebahq256.get_config()
    config.data.name = "lsun/church_outdoor"
    config.data.random_flip = True
    config.training.num_steps = 1_200_000
    return config
