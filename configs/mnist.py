"""MNIST from TFDS: 28x28 grey images resized to 32x32, a CIFAR-sized model at half width."""

from configs import default


def get_config():
    config = default.get_config()
    config.data.name = "mnist"
    config.data.image_size = 32
    config.data.channels = 1
    config.data.random_flip = False
    config.model.ch = 64
    config.model.ch_mult = (1, 2, 2)
    config.model.dropout = 0.1
    config.training.num_steps = 50_000
    config.training.ema_warmup = True  # early grids from an EMA that has caught up
    config.training.sample_every = 5000
    config.training.checkpoint_every = 5000
    config.training.grid_method = "dpm_solver"  # DPM-Solver++(2M), training.grid_steps = 25
    return config
