"""Class-conditional CIFAR10 with classifier-free guidance: the paper's recipe (`configs/cifar10.py`)
plus a learned class embedding over the 10 classes and a null class (label dropout 0.1); sampled
with guidance scale w = 3. The embedding adds (10 + 1) x 512 parameters."""

from configs import cifar10


def get_config():
    config = cifar10.get_config()
    config.model.num_classes = 10
    config.model.class_dropout = 0.1
    config.sample.guidance_scale = 3.0
    return config
