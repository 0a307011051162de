"""Class-conditional MNIST with classifier-free guidance (w = 5): `configs/mnist.py` plus a learned
class embedding over the 10 digits and a null class (label dropout 0.1)."""

from configs import mnist


def get_config():
    config = mnist.get_config()
    config.model.num_classes = 10
    config.model.class_dropout = 0.1
    config.sample.guidance_scale = 5.0
    return config
