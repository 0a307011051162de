"""The PyTorch reference: diffusers' `UNet2DModel` doing the same work as our train step and samplers.

For `configs/cifar10.py` the model is `google/ddpm-cifar10-32` (the authors' UNet ported to
PyTorch, 35,746,307 parameters; written out here, nothing is downloaded). A train step is the
paper's: t ~ U{0..T-1}, ε ~ N(0, I), random flip, L_simple, backward, global-norm clipping at 1,
Adam, EMA. Sampling is diffusers' own `DDPMScheduler` (fixed_large, clipped x̂_0) or
`DDIMScheduler` loop, one Python iteration and one UNet call per step.

The reference gets PyTorch's fastest standard CPU settings: `torch.set_num_threads` (2 here),
fused Adam, `inference_mode` for sampling. Standalone:

    python benchmarks/torch_reference.py --config cifar10 --what train --batch 16
    python benchmarks/torch_reference.py --config digits --what sample --batch 100

`train_throughput.py --torch` and `sample_throughput.py --torch` run these interleaved with ours
in one process and print the ratio.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402


def diffusers_unet_config(config) -> dict[str, Any]:
    """`UNet2DModel` kwargs computing our UNet of `config` (for CIFAR10: google/ddpm-cifar10-32)."""
    from flax import nnx

    from ddpm_jax import convert, model_fns

    return convert.diffusers_unet_config(nnx.eval_shape(lambda: model_fns.create_model(config)))


_DEVICE = "cpu"  # or "cuda": `set_device`


def set_device(name: str) -> None:
    """Where the reference runs: "cpu" or "cuda" (the same GPU as ours, benchmarks/gpu.sh)."""
    global _DEVICE
    _DEVICE = name


def _autocast(config):
    """bfloat16 compute with float32 parameters when `model.dtype=bfloat16`, as ours does."""
    import contextlib

    import torch

    if config.model.dtype == "bfloat16":
        return torch.autocast(_DEVICE, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _synchronize() -> None:
    import torch

    if _DEVICE == "cuda":
        torch.cuda.synchronize()


def _alphas_cumprod(config):
    import torch

    dc = config.diffusion
    if dc.beta_schedule != "linear":
        raise ValueError(f"the torch reference implements the linear schedule only, got {dc.beta_schedule!r}")
    betas = torch.linspace(dc.beta_start, dc.beta_end, dc.num_timesteps, dtype=torch.float64)
    return torch.cumprod(1.0 - betas, 0)


class TorchTrainer:
    """One object per benchmark: `run(k)` performs k complete optimizer steps on batch `batch`."""

    def __init__(self, config, batch: int, seed: int = 0):
        import torch
        from diffusers import UNet2DModel

        torch.manual_seed(seed)
        tc = config.training
        self.config = config
        self.batch = batch
        self.model = UNet2DModel(**diffusers_unet_config(config)).train().to(_DEVICE)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.ema = [p.detach().clone() for p in self.params]
        self.optimizer = _adam(self.params, tc)
        alphas_cumprod = _alphas_cumprod(config)
        self.sqrt_alphas_cumprod = alphas_cumprod.sqrt().float().to(_DEVICE)
        self.sqrt_one_minus_alphas_cumprod = (1.0 - alphas_cumprod).sqrt().float().to(_DEVICE)
        size, channels = config.data.image_size, config.data.channels
        generator = torch.Generator().manual_seed(seed)
        self.images_uint8 = torch.randint(0, 256, (batch, channels, size, size), dtype=torch.uint8,
                                          generator=generator).to(_DEVICE)

    def step(self) -> float:
        import torch

        config = self.config
        x_start = self.images_uint8.float() / 127.5 - 1.0
        if config.data.random_flip:
            flip = torch.rand(self.batch, device=_DEVICE) < 0.5
            x_start = torch.where(flip[:, None, None, None], x_start.flip(3), x_start)
        t = torch.randint(0, config.diffusion.num_timesteps, (self.batch,), device=_DEVICE)
        noise = torch.randn_like(x_start)
        x_t = (self.sqrt_alphas_cumprod[t][:, None, None, None] * x_start
               + self.sqrt_one_minus_alphas_cumprod[t][:, None, None, None] * noise)
        with _autocast(config):
            output = self.model(x_t, t).sample
        loss = ((output.float() - noise) ** 2).mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, config.training.grad_clip)
        self.optimizer.step()
        with torch.no_grad():
            torch._foreach_lerp_(self.ema, self.params, 1.0 - config.training.ema_decay)
        return loss.detach()

    def run(self, steps: int) -> float:
        loss = math.nan
        for _ in range(steps):
            loss = self.step()
        _synchronize()
        return float(loss)


def _adam(params, training_config):
    import torch

    tc = training_config
    kwargs = dict(lr=tc.lr, betas=(tc.adam_b1, tc.adam_b2), eps=tc.adam_eps)
    try:
        return torch.optim.Adam(params, fused=True, **kwargs)
    except (RuntimeError, TypeError):  # fused CPU Adam needs torch >= 2.4
        return torch.optim.Adam(params, foreach=True, **kwargs)


class TorchSampler:
    """`run()` performs the first `num_steps` iterations of diffusers' reverse-process loop."""

    def __init__(self, config, batch: int, method: str, num_steps: int, seed: int = 0):
        import torch
        from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel

        torch.manual_seed(seed)
        dc, sc = config.diffusion, config.sample
        self.model = UNet2DModel(**diffusers_unet_config(config)).eval().to(_DEVICE)
        self.config = config
        common_kwargs = dict(num_train_timesteps=dc.num_timesteps, beta_start=dc.beta_start,
                             beta_end=dc.beta_end, beta_schedule=dc.beta_schedule,
                             clip_sample=sc.clip_denoised)
        if method == "ancestral":
            variance = {"fixedlarge": "fixed_large", "fixedsmall": "fixed_small"}[dc.var_type]
            self.scheduler = DDPMScheduler(variance_type=variance, **common_kwargs)
            self.scheduler.set_timesteps(dc.num_timesteps)
            self.eta = None
        elif method == "ddim":
            self.scheduler = DDIMScheduler(**common_kwargs)
            self.scheduler.set_timesteps(sc.ddim_steps)
            self.eta = sc.ddim_eta
        else:
            raise ValueError(f"unknown sampling method {method!r}")
        self.chain_length = len(self.scheduler.timesteps)
        self.timesteps = self.scheduler.timesteps[:num_steps]
        size, channels = config.data.image_size, config.data.channels
        self.shape = (batch, channels, size, size)
        self.generator = torch.Generator(_DEVICE).manual_seed(seed)

    def run(self):
        import torch

        with torch.inference_mode(), _autocast(self.config):
            x = torch.randn(self.shape, generator=self.generator, device=_DEVICE)
            for t in self.timesteps:
                output = self.model(x, t).sample.float()
                if self.eta is None:
                    x = self.scheduler.step(output, t, x, generator=self.generator).prev_sample
                else:
                    x = self.scheduler.step(output, t, x, eta=self.eta,
                                            generator=self.generator).prev_sample
        _synchronize()
        return x


_TORCH_CATEGORIES = {
    "aten::mkldnn_convolution": "convolution: forward",
    "aten::convolution_backward": "convolution: input and kernel gradients",
    "aten::mm": "dot", "aten::addmm": "dot", "aten::bmm": "dot", "aten::baddbmm": "dot",
}


def profile_categories(run, steps: int) -> dict[str, float]:
    """Self CPU seconds per step of `run()` (doing `steps` steps), by op category."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    seconds: dict[str, float] = {}
    for event in prof.key_averages():
        category = _TORCH_CATEGORIES.get(event.key)
        if category is None:
            category = "attention" if "scaled_dot_product" in event.key else "other"
        seconds[category] = seconds.get(category, 0.0) + event.self_cpu_time_total * 1e-6 / steps
    return dict(sorted(seconds.items(), key=lambda kv: -kv[1]))


def set_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    # Inter-op threads only matter for graph-parallel execution, which eager diffusers does not use.


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="cifar10")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--what", choices=("train", "sample"), default="train")
    parser.add_argument("--method", choices=("ancestral", "ddim"), default="ancestral")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=2,
                        help="train steps, or reverse-chain steps, per timed repetition")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--profile", action="store_true",
                        help="train: also print PyTorch's own time per op category (torch.profiler)")
    args = parser.parse_args(argv)
    common.setup_environment()
    import torch

    set_threads(args.threads)
    config = common.load_config(args.config, args.set)
    if args.what == "train":
        trainer = TorchTrainer(config, args.batch)
        trainer.run(1)  # warm-up: allocator, first-call dispatch
        timing = common.interleaved_medians({"torch": lambda: trainer.run(args.steps)}, args.reps)["torch"]
        per_step = timing["median_s"] / args.steps
        common.emit({"bench": "train", "impl": "torch", "config": args.config,
                     "batch": args.batch, "steps_per_rep": args.steps, **timing,
                     "images_per_s": args.batch / per_step, "steps_per_s": 1 / per_step,
                     "threads": torch.get_num_threads(), "peak_rss_bytes": common.peak_rss_bytes()})
        if args.profile:
            common.emit({"bench": "train", "impl": "torch", "config": args.config,
                         "profile_s_per_step": profile_categories(lambda: trainer.run(args.steps),
                                                                  args.steps)})
    else:
        sampler = TorchSampler(config, args.batch, args.method, args.steps)
        sampler.run()
        timing = common.interleaved_medians({"torch": sampler.run}, args.reps)["torch"]
        per_step = timing["median_s"] / len(sampler.timesteps)
        common.emit({"bench": "sample", "impl": "torch", "method": args.method,
                     "config": args.config, "batch": args.batch,
                     "chain_steps_timed": len(sampler.timesteps),
                     "chain_length": sampler.chain_length, **timing,
                     "denoise_steps_per_s": 1 / per_step,
                     "images_per_s": args.batch / (per_step * sampler.chain_length),
                     "threads": torch.get_num_threads(), "peak_rss_bytes": common.peak_rss_bytes()})


if __name__ == "__main__":
    main()
