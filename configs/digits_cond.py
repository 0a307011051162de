"""The CPU quickstart, class-conditional: digits 0..9 with classifier-free guidance.

Same data, model and schedule as `configs/digits.py`, plus a learned class embedding (10 classes
and a null class dropped in with p = 0.1). `--mode=sample` draws one grid row per digit with
guidance scale w = 3.
"""

from configs import digits


def get_config():
    config = digits.get_config()
    config.model.num_classes = 10
    config.model.class_dropout = 0.1
    config.sample.guidance_scale = 3.0
    return config
