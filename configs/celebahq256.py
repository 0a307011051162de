"""CelebA-HQ 256x256 (docs/original.md §7): `unet2d16b2c112244`, 113,673,219 parameters.

TFDS `celeb_a_hq/256` needs a manual download (see the TFDS catalog); point
`--config.data.data_dir` at the prepared data. lr 2e-5, batch 64 (8 per core), dropout 0,
fixedsmall variance, random flips, 0.5M steps.
"""

from configs import default


def get_config():
    config = default.get_config()
    config.data.name = "celeb_a_hq/256"
    config.data.eval_split = ""
    config.data.image_size = 256
    config.data.in_memory = False
    config.data.random_flip = True
    config.model.ch_mult = (1, 1, 2, 2, 4, 4)
    config.model.dropout = 0.0
    config.diffusion.var_type = "fixedsmall"
    # The 256 models used `GaussianDiffusion`, which clips the posterior log-variance at log 1e-20.
    config.diffusion.t0_log_variance = "1e-20"
    config.training.lr = 2e-5
    config.training.batch_size = 64
    config.training.num_steps = 500_000
    config.training.steps_per_call = 10
    config.training.log_every = 100
    config.training.sample_every = 50_000
    config.training.num_grid_samples = 16
    config.sample.batch_size = 64
    config.eval.batch_size = 64
    # FID reference statistics from at most 50,000 real images, as StyleGAN2's fid50k (which the
    # paper's 256×256 FIDs used) reads them; the LSUN splits hold millions of images.
    config.eval.ref_max_images = 50_000
    return config
