"""LSUN cat 256x256 (docs/original.md §7): the 113,673,219-parameter model, 1_800_000 steps.

Data: TFDS `lsun/cat` (images centre-cropped and resized to 256x256), streamed.
lr 2e-5, batch 64, dropout 0, fixedsmall variance. Flips: the run_lsun.py docstring passes --randflip 0 for cat.
"""

from configs import celebahq256


def get_config():
    config = celebahq256.get_config()
    config.data.name = "lsun/cat"
    config.data.random_flip = False
    config.training.num_steps = 1_800_000
    return config
