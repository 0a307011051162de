"""CIFAR10, exactly the paper's recipe (FID 3.17 / IS 9.46): `unet2d16b2`, 35,746,307 params.

Batch 128 over the data mesh (16 per core on a TPU v3-8), Adam 2e-4 with 5000 warmup steps,
per-device clipping at 1.0, EMA 0.9999, dropout 0.1, random flips, T = 1000 linear betas,
eps prediction with fixedlarge variance and L_simple, 800k steps.
"""

from configs import default


def get_config():
    config = default.get_config()
    config.data.name = "cifar10"
    return config
