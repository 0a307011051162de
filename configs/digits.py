"""CPU quickstart: a small UNet on scikit-learn's bundled 8x8 digits (real data, offline).

About five minutes on two CPU cores; writes sample grids of recognisable digits to
`workdir/samples/`. Same math as the paper, scaled down: 1,797 grey 8x8 images.
"""

from configs import default


def get_config():
    config = default.get_config()
    config.data.name = "digits"
    config.data.image_size = 8
    config.data.channels = 1
    config.data.random_flip = False  # digits are not mirror-symmetric
    config.data.eval_split = ""  # scikit-learn's digits have no test split
    config.model.ch = 32
    config.model.ch_mult = (1, 2)
    config.model.num_res_blocks = 2
    config.model.attn_resolutions = (4,)
    config.model.dropout = 0.0
    config.training.batch_size = 64
    config.training.num_steps = 2000
    config.training.lr = 1e-3
    config.training.warmup_steps = 200
    config.training.ema_decay = 0.995  # a short run: keep the shadow close to recent weights
    config.training.ema_warmup = True  # ... and let it forget the initial weights quickly
    config.training.steps_per_call = 50
    config.training.log_every = 250
    config.training.checkpoint_every = 1000
    config.training.keep_checkpoints = 2
    config.training.archive_every = 0
    config.training.sample_every = 1000
    config.training.num_grid_samples = 100
    config.training.grid_method = "dpm_solver"  # DPM-Solver++(2M), training.grid_steps = 25
    config.sample.num_samples = 100
    config.sample.batch_size = 100
    config.eval.num_samples = 1000
    return config
