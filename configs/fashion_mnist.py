"""Fashion-MNIST from TFDS: the MNIST setup (28x28 grey resized to 32x32) on clothing images."""

from configs import mnist


def get_config():
    config = mnist.get_config()
    config.data.name = "fashion_mnist"
    return config
