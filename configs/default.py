"""Defaults shared by every config: the paper's CIFAR10 recipe (docs/original.md §3).

Other configs start from `get_config()` here and override what differs.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0
    # XLA's persistent compilation cache (a gs:// path works too); "" = off.
    config.compilation_cache_dir = "~/.cache/ddpm_jax/xla"

    config.data = data = ml_collections.ConfigDict()
    data.name = "cifar10"  # a TFDS name, "digits" (scikit-learn, bundled) or "imagefolder"
    data.split = "train"
    data.eval_split = "test"
    data.image_size = 32
    data.channels = 3
    data.random_flip = True  # per image, p = 0.5, on device like the original's model_fn
    data.data_dir = ""  # TFDS data_dir; empty = TFDS default
    data.folder = ""  # for name == "imagefolder": a tree of PNG/JPEG files
    data.in_memory = True  # load the split into host RAM: exact, step-indexed data order
    data.shuffle_buffer = 50_000  # unused: streaming shuffles whole epochs by index (D29)
    data.prefetch = 2  # host batches prepared ahead of the device

    config.model = model = ml_collections.ConfigDict()
    model.ch = 128
    model.ch_mult = (1, 2, 2, 2)
    model.num_res_blocks = 2
    model.attn_resolutions = (16,)
    model.dropout = 0.1
    model.num_classes = 0  # 0 (or 1) = unconditional, like the paper; > 1 = class-conditional
    model.class_dropout = 0.1  # conditional only: P(label -> null class) in training, for guidance
    model.dtype = "float32"  # compute dtype; "bfloat16" keeps params and optimizer in float32

    config.diffusion = diffusion = ml_collections.ConfigDict()
    diffusion.num_timesteps = 1000
    diffusion.beta_schedule = "linear"
    diffusion.beta_start = 1e-4
    diffusion.beta_end = 0.02
    diffusion.mean_type = "eps"
    diffusion.var_type = "fixedlarge"
    diffusion.loss_type = "mse"
    diffusion.t0_log_variance = "beta_tilde_1"  # log β̃_0 := log β̃_1 (GaussianDiffusion2); or "1e-20"

    config.training = training = ml_collections.ConfigDict()
    training.batch_size = 128  # global, over all devices of all hosts
    training.num_steps = 800_000
    training.lr = 2e-4
    training.warmup_steps = 5000
    training.adam_b1 = 0.9
    training.adam_b2 = 0.999
    training.adam_eps = 1e-8
    training.adam_eps_style = "tf"  # "tf": TF1's epsilon-hat form, as the original; "optax"
    training.grad_clip = 1.0
    # Clip each group of 16 consecutive examples, as the original's 8 replicas of 16 images did
    # on a TPU v3-8, on any device count; "per_device": each device's shard; "global": the mean.
    training.clip_mode = "group"
    training.clip_group_size = 16
    training.microbatch_size = 0  # per device; > 0 accumulates gradients over chunks (memory)
    training.ema_decay = 0.9999
    training.ema_warmup = False  # True: decay_t = min(ema_decay, (1 + t) / (10 + t)); the paper: off
    training.steps_per_call = 100  # optimizer steps per host call (lax.scan)
    training.log_every = 100
    training.checkpoint_every = 10_000
    training.keep_checkpoints = 3
    training.archive_every = 100_000  # checkpoints kept for good; 0 = none
    training.sample_every = 20_000  # EMA sample grid to TensorBoard and workdir/samples/
    training.num_grid_samples = 64
    training.grid_method = "sample"  # sampler of those grids: "sample" = as sample.*; or a method
    training.grid_steps = 25  # model calls of a ddim / dpm_solver / unipc grid
    training.max_nonfinite = 10  # consecutive skipped non-finite updates before stopping
    training.profile_steps = ()  # (start, end): a jax.profiler trace of those steps in workdir/profile

    config.sample = sample = ml_collections.ConfigDict()
    sample.method = "ancestral"  # or "ddim", "dpm_solver" (DPM-Solver++), "unipc"
    sample.num_steps = 0  # model calls of ddim / dpm_solver / unipc; 0 = ddim_steps / 25
    sample.solver_order = 2  # dpm_solver / unipc: 1..3 (2 = DPM-Solver++(2M))
    sample.timestep_spacing = "logsnr"  # dpm_solver / unipc: linspace, leading, trailing, logsnr
    sample.num_samples = 256
    sample.batch_size = 256  # global per call
    sample.ddim_steps = 100  # older name of num_steps for ddim, used while num_steps = 0
    sample.ddim_eta = 0.0
    sample.ddim_skip = "uniform"  # or "quad"
    sample.clip_denoised = True
    sample.progress_every = 50  # keep x0 predictions every k steps for strips/GIFs; 0 = off
    sample.seed = 0
    # Class-conditional models (model.num_classes > 1) only; an unconditional model refuses both.
    sample.guidance_scale = 0.0  # w: eps_uncond + w (eps_cond - eps_uncond); 0 = unconditional,
    # 1 = conditional without guidance, > 1 = guided (the *_cond configs set it)
    sample.labels = ""  # "" = one grid row per class 0..C-1; or a comma list, e.g. "3,7"
    # Editing tasks (--mode=sample): generate | img2img | inpaint | interpolate | denoise
    sample.task = "generate"
    sample.input = ""  # image file (PNG/JPEG) or .npz (key "images", uint8 NHWC)
    sample.input2 = ""  # interpolate: the second image(s)
    sample.mask = ""  # inpaint: image file, white = regenerate, black = keep
    sample.t0 = -1  # img2img / inpaint / interpolate: start from x_t0, in paper steps 0..T
    # (0 = the input itself); -1 = from sample.strength, else T/2 (inpaint: T)
    sample.strength = 0.0  # alternative to t0: t0 = round(strength * T)
    sample.num_mix = 5  # interpolate: mixing weights linspace(0, 1, num_mix)
    sample.denoise_steps = "50,100,200,400,600,800,999"  # denoise: 0-indexed steps t of x_t
    # anagram / hybrid (class-conditional models): the two classes c1,c2 of the composition
    sample.compose_labels = ""  # e.g. "6,9": anagram reads 6 upright, 9 through the flip
    sample.anagram_flip = "vertical"  # anagram: vertical (upside down) | horizontal | rotate180
    sample.hybrid_kernel_size = 5  # hybrid: odd size of the Gaussian low-pass kernel
    sample.hybrid_sigma = 1.0  # hybrid: its σ in pixels; low-pass from c1, high-pass from c2

    config.eval = evaluation = ml_collections.ConfigDict()
    evaluation.num_samples = 50_000  # for IS / FID; 0 = skip them (e.g. bits/dim only)
    evaluation.batch_size = 256  # global; samples per part file and Inception batch
    evaluation.seed = 0  # eval samples and bpd noise are pure functions of this key
    evaluation.inception_weights = ""  # "" = ~/.cache/ddpm_jax (downloaded on first use)
    evaluation.quantize = True  # Inception sees samples rounded to uint8 (as saved images);
    # False: unquantised (x+1)*127.5 floats, like the original repo's monitor
    evaluation.is_splits = 10  # 10 = OpenAI code (paper's ±); 1 = TF-GAN / repo monitor
    evaluation.stats_dir = ""  # reference stats cache; "" = ~/.cache/ddpm_jax/fid_stats
    evaluation.train_stats = ""  # precomputed stats npz (mu, sigma) instead of data.split
    evaluation.test_stats = ""  # precomputed stats npz instead of data.eval_split
    evaluation.ref_max_images = 0  # reference images per split; 0 = the whole split
    evaluation.bpd = False
    evaluation.bpd_train = False  # also the bound on data.split (the paper's "(train)" number)
    evaluation.bpd_batch_size = 256  # global; drop_remainder like the original
    evaluation.bpd_num_images = 0  # per split; 0 = all (rounded down to whole batches)
    evaluation.bpd_clip_denoised = True  # like the original's calc_bpd_loop
    # Sampler sweep: "" = sample.* as set; or a comma list of method:steps[:order], e.g.
    # "ancestral:1000,ddim:50,dpm_solver:20,dpm_solver:20:3,unipc:10" (steps = model calls)
    evaluation.samplers = ""
    return config
