"""Images/s of our compiled samplers (`ddpm_jax.generate.make_sample_fn`) on this machine.

Each sampler is one XLA program: a `lax.scan` over the reverse chain with the UNet inside, no
host round-trip per step. The whole 1000-step CIFAR10 chain takes an hour on 2 CPU cores, so
`--chain_steps N` times a chain of N steps and reports images/s of the full chain as
batch / (N-step time / N × full length): every step does the same work (one UNet evaluation on
the batch plus elementwise updates), whatever the schedule. For ours the N-step chain is the
same program with `diffusion.num_timesteps = N` (ancestral) or `sample.ddim_steps = N` (DDIM);
the reference runs the first N iterations of diffusers' full-length scheduler loop.

    python benchmarks/sample_throughput.py --config cifar10 --batch 16 --chain_steps 5 --torch
    python benchmarks/sample_throughput.py --config digits --batch 100 --torch   # full chains
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_common_flags(parser)
    parser.add_argument("--batch", type=int, default=16, help="global batch per sampler call")
    parser.add_argument("--methods", default="ancestral,ddim")
    parser.add_argument("--chain_steps", type=int, default=0,
                        help="reverse steps actually run per call (at most the chain); 0 = the full chain")
    return parser.parse_args(argv)


def chain_length(config, method: str) -> int:
    return config.diffusion.num_timesteps if method == "ancestral" else config.sample.ddim_steps


def build(config, mesh, batch: int, method: str, chain_steps: int):
    """Compiled sampler running `chain_steps` reverse steps; params replicated on the mesh."""
    import jax

    from ddpm_jax import generate, model_fns, parallel

    short = copy.deepcopy(config)
    if method == "ancestral":
        short.diffusion.num_timesteps = chain_steps
    else:
        short.sample.ddim_steps = chain_steps
    graphdef, params = model_fns.init_params(config)
    params = jax.device_put(params, parallel.replicated(mesh))
    sample_fn = generate.make_sample_fn(graphdef, short, mesh, batch, method=method)
    key = jax.random.key(0)
    start = time.perf_counter()
    compiled = sample_fn.lower(params, key).compile()
    compile_s = time.perf_counter() - start
    return compiled, params, key, compile_s


def main(argv=None) -> None:
    args = parse_args(argv)
    common.setup_environment(args.devices, args.xla_flags, args.platform)
    import jax
    import numpy as np

    from ddpm_jax import parallel

    config = common.load_config(args.config, args.set)
    mesh = parallel.make_mesh(jax.devices()[:args.devices])
    if args.torch:
        import torch

        import torch_reference

        torch_reference.set_threads(args.torch_threads)
        torch_reference.set_device(args.platform)

    for method in args.methods.split(","):
        full = chain_length(config, method)
        steps = min(args.chain_steps, full) if args.chain_steps else full
        compiled, params, key, compile_s = build(config, mesh, args.batch, method, steps)
        costs = common.xla_costs(compiled)

        def run_jax():
            samples = compiled(params, key)
            return jax.block_until_ready(samples)

        start = time.perf_counter()
        samples = np.asarray(run_jax())
        first_call_s = time.perf_counter() - start
        if not np.all(np.isfinite(samples)):
            raise RuntimeError(f"{method} sampler produced non-finite values")
        runners = {"jax": run_jax}
        if args.torch:
            sampler = torch_reference.TorchSampler(config, args.batch, method, steps)
            assert sampler.chain_length == full, (sampler.chain_length, full)
            sampler.run()
            runners["torch"] = sampler.run
        timings = common.interleaved_medians(runners, args.reps)

        base = {"bench": "sample", "method": method, "config": args.config,
                **common.config_summary(config), "devices": args.devices, "batch": args.batch,
                "chain_steps_timed": steps, "chain_length": full}
        per_step = timings["jax"]["median_s"] / steps
        # The cost analysis is of one device's program (its share of the batch).
        flops = costs["flops"] * args.devices if costs["flops"] else None
        common.emit({**base, "impl": "jax", **timings["jax"], "compile_s": compile_s,
                     "first_call_s": first_call_s, "s_per_denoise_step": per_step,
                     "denoise_steps_per_s": 1 / per_step,
                     "images_per_s": args.batch / (per_step * full),
                     "xla_flops_per_denoise_step": flops,
                     "achieved_gflop_per_s": flops / per_step / 1e9 if flops else None,
                     "xla_memory": common.xla_memory(compiled),
                     "peak_rss_bytes": common.peak_rss_bytes(), **common.machine_info()})
        if args.torch:
            torch_step = timings["torch"]["median_s"] / steps
            common.emit({**base, "impl": "torch", **timings["torch"],
                         "s_per_denoise_step": torch_step, "denoise_steps_per_s": 1 / torch_step,
                         "images_per_s": args.batch / (torch_step * full),
                         "achieved_gflop_per_s": flops / torch_step / 1e9 if flops else None,
                         "threads": torch.get_num_threads(), "torch": torch.__version__})
            common.emit({**base, "impl": "ratio",
                         "jax_over_torch_images_per_s": torch_step / per_step})
        if args.profile:
            common.emit({**base, "impl": "jax", "profile": common.profile_ops(
                run_jax, os.path.join(args.profile, method), compiled.as_text())})


if __name__ == "__main__":
    main()
