"""Images/s of the compiled train step (`ddpm_jax.train_step.make_train_step`) on this machine.

One call runs `steps_per_call` complete optimizer steps (scan inside one XLA program; the state
is donated). Compile time is measured separately (AOT `lower().compile()`), then the median over
`--reps` calls. Achieved FLOP/s use XLA's own FLOP count of one step. With `--torch` the
diffusers reference (`torch_reference.TorchTrainer`, same architecture, Adam, batch) is timed
in the same run, interleaved call by call, and a ratio line is printed.

    python benchmarks/train_throughput.py --config cifar10 --per_device_batch 16 --steps_per_call 2 --torch
    python benchmarks/train_throughput.py --config digits --per_device_batch 64 --steps_per_call 50 --torch

`--baseline conv.PER_SLICE_UNDER_VMAP=False` (repeatable, `module.ATTR=VALUE` of `ddpm_jax`)
also builds the step with those switches set and times it interleaved with the others
(`impl: jax_baseline`), so that old and new are compared under the same load.
`--baseline_xla_option xla_cpu_opt_preset=CPU_OPT_PRESET_FAST_RUNTIME` (repeatable) compiles
that baseline with XLA options instead of or as well as switches: XLA_FLAGS apply to a whole
process, these to one program, so that an XLA option is timed against the default in one run.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_common_flags(parser)
    parser.add_argument("--per_device_batch", type=int, default=16)
    parser.add_argument("--steps_per_call", type=int, default=2,
                        help="optimizer steps per call (the config's value is for TPUs; a CIFAR "
                             "step takes seconds on 2 CPU cores)")
    parser.add_argument("--baseline", action="append", default=[], metavar="MODULE.ATTR=VALUE",
                        help="also time the step built with ddpm_jax.MODULE.ATTR = VALUE, e.g. "
                             "conv.PER_SLICE_UNDER_VMAP=False (repeatable)")
    parser.add_argument("--baseline_xla_option", action="append", default=[],
                        metavar="NAME=VALUE",
                        help="compile the baseline step with this XLA option, e.g. "
                             "xla_cpu_opt_preset=CPU_OPT_PRESET_FAST_RUNTIME (repeatable)")
    return parser.parse_args(argv)


def parse_switches(items: list[str]) -> list[tuple[Any, str, Any]]:
    """`module.ATTR=VALUE` items → (ddpm_jax module, attribute, value); exit 2 on a bad one."""
    import ast
    import importlib

    switches = []
    for item in items:
        key, _, raw = item.partition("=")
        module_name, _, attr = key.rpartition(".")
        try:
            module = importlib.import_module(f"ddpm_jax.{module_name}")
            value = ast.literal_eval(raw)
        except (ImportError, ValueError, SyntaxError):
            module = value = None
        if module is None or not hasattr(module, attr):
            print(f"error: --baseline {item!r} is not MODULE.ATTR=VALUE of an existing ddpm_jax "
                  "attribute and a Python literal; e.g. --baseline "
                  "conv.PER_SLICE_UNDER_VMAP=False", file=sys.stderr)
            raise SystemExit(2)
        switches.append((module, attr, value))
    return switches


def parse_xla_options(items: list[str]) -> dict[str, Any]:
    """`NAME=VALUE` items → XLA compile options (true/false and integers typed); exit 2 on a
    name that is no XLA option name."""
    options: dict[str, Any] = {}
    for item in items:
        name, sep, raw = item.partition("=")
        if not (sep and name.startswith("xla_") and raw):
            print(f"error: --baseline_xla_option {item!r} is not NAME=VALUE with an XLA option "
                  "name; e.g. --baseline_xla_option xla_cpu_opt_preset=CPU_OPT_PRESET_FAST_RUNTIME",
                  file=sys.stderr)
            raise SystemExit(2)
        lowered = raw.lower()
        options[name] = (lowered == "true" if lowered in ("true", "false")
                         else int(raw) if raw.lstrip("-").isdigit() else raw)
    return options


def compile_with(lowered, xla_options: dict[str, Any] | None):
    """`lowered.compile()` with `xla_options`; an option XLA refuses exits 2 with its reason
    (other compile errors propagate)."""
    import jax

    try:
        return lowered.compile(compiler_options=xla_options or None)
    except jax.errors.JaxRuntimeError as e:
        reason = str(e).splitlines()[0]
        if not xla_options or "option" not in reason:
            raise
        print(f"error: XLA refused --baseline_xla_option {xla_options}: {reason}",
              file=sys.stderr)
        raise SystemExit(2) from None


def build_with(switches: list[tuple[Any, str, Any]], *args, xla_options=None):
    """`build(*args)` with the module attributes `switches` set while it traces, compiled with
    `xla_options`."""
    saved = [(module, attr, getattr(module, attr)) for module, attr, _ in switches]
    try:
        for module, attr, value in switches:
            setattr(module, attr, value)
        return build(*args, xla_options=xla_options)
    finally:
        for module, attr, value in reversed(saved):
            setattr(module, attr, value)


def build(config, devices: int, per_device_batch: int, steps_per_call: int, xla_options=None):
    """The train state on the mesh, the compiled step and a fixed uint8 batch for it."""
    import jax
    import numpy as np

    from ddpm_jax import parallel, train_step

    config.training.batch_size = per_device_batch * devices
    config.training.steps_per_call = steps_per_call
    mesh = parallel.make_mesh(jax.devices()[:devices])
    graphdef, state = train_step.create_train_state(config, mesh)
    step = train_step.make_train_step(graphdef, config, mesh)

    size, channels = config.data.image_size, config.data.channels
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (steps_per_call, config.training.batch_size, size, size, channels),
                          dtype=np.uint8)
    labels = np.zeros((steps_per_call, config.training.batch_size), np.int32)
    images = parallel.to_global_array(images, mesh, batch_axis=1)
    labels = parallel.to_global_array(labels, mesh, batch_axis=1)
    seed_key = jax.random.key(0)

    start = time.perf_counter()
    compiled = compile_with(step.lower(state, images, labels, seed_key), xla_options)
    compile_s = time.perf_counter() - start
    return compiled, state, (images, labels, seed_key), compile_s


def main(argv=None) -> None:
    args = parse_args(argv)
    common.setup_environment(args.devices, args.xla_flags, args.platform)
    import jax
    import numpy as np

    config = common.load_config(args.config, args.set)
    switches = parse_switches(args.baseline)
    xla_options = parse_xla_options(args.baseline_xla_option)
    has_baseline = bool(args.baseline or xla_options)
    compiled, state, batch, compile_s = build(config, args.devices, args.per_device_batch,
                                              args.steps_per_call)
    global_batch = config.training.batch_size
    k = args.steps_per_call
    costs = common.xla_costs(compiled)
    holder = {"state": state}

    def run_jax():
        holder["state"], metrics = compiled(holder["state"], *batch)
        jax.block_until_ready((holder["state"], metrics))
        return metrics

    start = time.perf_counter()
    metrics = run_jax()  # first execution: allocations, thread-pool start-up
    first_call_s = time.perf_counter() - start
    runners = {"jax": run_jax}
    if has_baseline:
        import copy

        base_compiled, base_state, base_batch, base_compile_s = build_with(
            switches, copy.deepcopy(config), args.devices, args.per_device_batch,
            args.steps_per_call, xla_options=xla_options)
        base_holder = {"state": base_state}

        def run_baseline():
            base_holder["state"], out = base_compiled(base_holder["state"], *base_batch)
            jax.block_until_ready((base_holder["state"], out))
            return out

        run_baseline()
        runners["jax_baseline"] = run_baseline
    trainer = None
    if args.torch:
        import torch_reference

        torch_reference.set_threads(args.torch_threads)
        torch_reference.set_device(args.platform)
        trainer = torch_reference.TorchTrainer(config, global_batch)
        trainer.run(1)
        runners["torch"] = lambda: trainer.run(k)
    timings = common.interleaved_medians(runners, args.reps)
    metrics = jax.device_get(run_jax())
    if not np.all(np.isfinite(metrics["loss"])):
        raise RuntimeError(f"non-finite training loss {metrics['loss']}")

    base = {"bench": "train", "config": args.config, **common.config_summary(config),
            "devices": args.devices, "per_device_batch": args.per_device_batch,
            "global_batch": global_batch, "steps_per_rep": k}
    jax_time = timings["jax"]["median_s"] / k
    # The cost analysis is of one device's program (its share of the batch).
    flops = costs["flops"] * args.devices if costs["flops"] else None
    common.emit({**base, "impl": "jax", **timings["jax"], "compile_s": compile_s,
                 "first_call_s": first_call_s, "s_per_step": jax_time,
                 "steps_per_s": 1 / jax_time, "images_per_s": global_batch / jax_time,
                 "xla_flops_per_step": flops,
                 "achieved_gflop_per_s": flops / jax_time / 1e9 if flops else None,
                 "loss_last": float(metrics["loss"][-1]),
                 "xla_memory": common.xla_memory(compiled),
                 "peak_rss_bytes": common.peak_rss_bytes(), **common.machine_info()})
    if has_baseline:
        base_time = timings["jax_baseline"]["median_s"] / k
        common.emit({**base, "impl": "jax_baseline", "baseline": args.baseline,
                     "baseline_xla_options": xla_options,
                     **timings["jax_baseline"], "compile_s": base_compile_s,
                     "s_per_step": base_time, "images_per_s": global_batch / base_time})
        common.emit({**base, "impl": "ratio", "baseline_over_jax_s_per_step": base_time / jax_time})
    if trainer is not None:
        import torch

        torch_time = timings["torch"]["median_s"] / k
        common.emit({**base, "impl": "torch", **timings["torch"], "s_per_step": torch_time,
                     "steps_per_s": 1 / torch_time, "images_per_s": global_batch / torch_time,
                     "achieved_gflop_per_s": flops / torch_time / 1e9 if flops else None,
                     "threads": torch.get_num_threads(), "torch": torch.__version__})
        common.emit({**base, "impl": "ratio", "jax_over_torch_images_per_s": torch_time / jax_time})
    if args.profile:
        common.emit({**base, "impl": "jax", "profile": common.profile_ops(
            run_jax, args.profile, compiled.as_text())})
        if has_baseline:
            common.emit({**base, "impl": "jax_baseline", "profile": common.profile_ops(
                run_baseline, os.path.join(args.profile, "baseline"), base_compiled.as_text())})


if __name__ == "__main__":
    main()
