"""Your own images: a folder tree of PNG/JPEG files of any size.

    python -m ddpm_jax.main --config configs/imagefolder.py --workdir runs/mine \
        --config.data.folder=/path/to/images [--config.data.image_size=128]

Images are centre-cropped to squares and resized to `data.image_size` (64 by default, e.g.
TinyImageNet; 128 for e.g. butterflies: add a level with --config.model.ch_mult="(1,1,2,2,4)").
First-level subfolders become class labels. The whole folder is decoded into host memory once.
"""

from configs import default


def get_config():
    config = default.get_config()
    config.data.name = "imagefolder"
    config.data.folder = ""
    config.data.eval_split = ""
    config.data.image_size = 64
    config.data.random_flip = True
    config.model.ch_mult = (1, 2, 2, 2)  # 64 → 32 → 16 (attention) → 8
    config.training.batch_size = 64
    config.training.num_steps = 200_000
    config.training.ema_warmup = True  # early grids from an EMA that has caught up
    config.training.sample_every = 10_000
    config.training.grid_method = "dpm_solver"  # DPM-Solver++(2M), training.grid_steps = 25
    return config
