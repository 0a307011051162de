"""Shared test fixtures: a tiny config that compiles and runs in seconds on CPU."""

from configs import default


def tiny_config():
    config = default.get_config()
    config.data.name = "digits"
    config.data.image_size = 8
    config.data.channels = 1
    config.data.random_flip = True
    config.model.ch = 32
    config.model.ch_mult = (1, 2)
    config.model.num_res_blocks = 1
    config.model.attn_resolutions = (4,)
    config.model.dropout = 0.0
    config.diffusion.num_timesteps = 20
    tc = config.training
    tc.batch_size = 16
    tc.num_steps = 4
    tc.lr = 1e-3
    tc.warmup_steps = 0
    tc.ema_decay = 0.9
    tc.steps_per_call = 1
    tc.log_every = 1
    tc.checkpoint_every = 2
    tc.keep_checkpoints = 10
    tc.archive_every = 0
    tc.sample_every = 0
    tc.num_grid_samples = 16
    config.sample.num_samples = 16
    config.sample.batch_size = 16
    config.sample.progress_every = 5
    config.sample.ddim_steps = 5
    return config
