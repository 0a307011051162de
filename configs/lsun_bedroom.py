"""LSUN bedroom 256x256 (docs/original.md §7): the 113,673,219-parameter model, 2_400_000 steps.

Data: TFDS `lsun/bedroom` (images centre-cropped and resized to 256x256), streamed.
lr 2e-5, batch 64, dropout 0, fixedsmall variance. Flips: the paper trains Bedroom without flips (the script's default would flip; the paper wins here).
"""

from configs import celebahq256


def get_config():
    config = celebahq256.get_config()
    config.data.name = "lsun/bedroom"
    config.data.random_flip = False
    config.training.num_steps = 2_400_000
    return config
