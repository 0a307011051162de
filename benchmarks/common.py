"""Shared plumbing of the benchmark scripts: environment, configs, timing, XLA's own numbers.

Every script prints one JSON object per line and measurement, so results can be collected with
`grep '^{'` and compared across runs. Timings are medians over repetitions; when the PyTorch
reference is measured in the same run its repetitions are interleaved with ours, so that load
from other processes on the machine slows both sides alike.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The paper's own figures on a TPU v3-8 (docs/original.md §3.5 and §4).
PAPER_TRAIN_SECONDS_PER_STEP = 1 / 21  # "21 steps per second at batch size 128" = 47.6 ms
PAPER_SAMPLE_SECONDS_256 = 17.0  # "sampling a batch of 256 images takes 17 seconds"


def setup_environment(devices: int = 1, xla_flags: str = "", platforms: str = "cpu") -> None:
    """Must run before JAX is imported: CPU backend, `devices` host devices, extra XLA flags.

    One device is the default so that the whole batch is one XLA computation using both cores
    through XLA:CPU's intra-op thread pool, as PyTorch uses its 2 threads on one batch.
    """
    if "jax" in sys.modules:
        raise RuntimeError("setup_environment must be called before jax is imported")
    os.environ["JAX_PLATFORMS"] = platforms
    flags = os.environ.get("XLA_FLAGS", "").split()
    flags = [f for f in flags if not f.startswith("--xla_force_host_platform_device_count")]
    if devices > 1:
        flags.append(f"--xla_force_host_platform_device_count={devices}")
    flags += xla_flags.split()
    os.environ["XLA_FLAGS"] = " ".join(flags)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if REPO_ROOT not in sys.path:
        sys.path.insert(0, REPO_ROOT)


def add_common_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="cifar10",
                        help="module name under configs/ (cifar10, digits, ...)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override, e.g. --set model.dtype=bfloat16 (repeatable)")
    parser.add_argument("--devices", type=int, default=1,
                        help="simulated CPU devices of the data mesh (1 = whole batch on one)")
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions (median reported)")
    parser.add_argument("--xla_flags", default="", help="extra XLA_FLAGS, e.g. '--xla_cpu_use_onednn=true'")
    parser.add_argument("--torch", action="store_true",
                        help="also time the PyTorch/diffusers reference, interleaved, and print the ratio")
    parser.add_argument("--torch_threads", type=int, default=2)
    parser.add_argument("--platform", default="cpu", choices=("cpu", "cuda"),
                        help="JAX backend (and, with --torch, the torch device): cpu or cuda "
                             "(one GPU; benchmarks/gpu.sh)")
    parser.add_argument("--profile", default="",
                        help="directory: profile one more call and print time per XLA op category")


def load_config(name: str, overrides: list[str]):
    """`configs.<name>.get_config()` with `KEY=VALUE` overrides parsed as Python literals."""
    import ast

    config = importlib.import_module(f"configs.{name}").get_config()
    for item in overrides:
        key, _, raw = item.partition("=")
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw
        *parents, leaf = key.split(".")
        node = config
        for parent in parents:
            node = getattr(node, parent)
        setattr(node, leaf, value)
    return config


def emit(record: dict[str, Any]) -> None:
    print(json.dumps(record, sort_keys=False), flush=True)


def timed(fn: Callable[[], Any]) -> float:
    """Wall seconds of `fn()`; `fn` must block until its result is ready."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def interleaved_medians(runners: dict[str, Callable[[], Any]], reps: int) -> dict[str, dict]:
    """Runs each runner `reps` times, alternating between them; median and spread per runner."""
    samples: dict[str, list[float]] = {name: [] for name in runners}
    load_before = os.getloadavg()[0]
    for _ in range(reps):
        for name, fn in runners.items():
            samples[name].append(timed(fn))
    # The 1-minute load average of the machine: other processes competing for the 2 cores.
    load = {"load_avg_1m_before": load_before, "load_avg_1m_after": os.getloadavg()[0]}
    return {name: {"median_s": statistics.median(s), "min_s": min(s), "max_s": max(s),
                   "reps": len(s), **load} for name, s in samples.items()}


def xla_costs(compiled) -> dict[str, float | None]:
    """FLOPs, bytes and (on TPU) the cost model's seconds of one compiled program.

    XLA's HLO cost analysis counts the body of a while loop once, whatever its trip count, so
    for our `lax.scan` programs these are the costs of one loop iteration (plus what runs
    outside the loop, which is negligible here).
    """
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else {}
    analysis = analysis or {}
    return {
        "flops": analysis.get("flops"),
        "bytes_accessed": analysis.get("bytes accessed"),
        "transcendentals": analysis.get("transcendentals"),
        "optimal_seconds": analysis.get("optimal_seconds"),
    }


def xla_memory(compiled) -> dict[str, int | None]:
    """Per-device buffer sizes XLA assigned: arguments, outputs, temporaries, donated aliases."""
    stats = compiled.memory_analysis()
    if stats is None:
        return {}
    fields = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
              "alias_size_in_bytes", "generated_code_size_in_bytes")
    out = {f: int(getattr(stats, f)) for f in fields if hasattr(stats, f)}
    # Donated arguments alias outputs; they occupy memory once.
    out["peak_estimate_bytes"] = (out["argument_size_in_bytes"] + out["output_size_in_bytes"]
                                  - out["alias_size_in_bytes"] + out["temp_size_in_bytes"])
    return out


def peak_rss_bytes() -> int:
    """The process's peak resident set so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def machine_info() -> dict[str, Any]:
    import jax

    info = {
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "devices": jax.device_count(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "load_avg_1m": os.getloadavg()[0],
    }
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return info


def config_summary(config) -> dict[str, Any]:
    m = config.model
    return {"image_size": config.data.image_size, "ch": m.ch, "ch_mult": list(m.ch_mult),
            "num_res_blocks": m.num_res_blocks, "dtype": m.dtype, "dropout": m.dropout}


def _conv_kind(op_name: str) -> str:
    if "conv_kernel_gradient" in op_name:
        return "convolution: kernel gradient"
    if "conv_input_gradient" in op_name:
        return "convolution: input gradient"
    if "transpose(" in op_name:
        return "convolution: gradient (XLA's own)"
    return "convolution: forward"


def hlo_ops(hlo_text: str) -> dict[str, tuple[str, float]]:
    """Instruction name → (what it does, FLOPs of its convolution or 0), from `compiled.as_text()`.

    Fusions are labelled by the heaviest operation they call (convolution > dot > other), so
    time can be attributed to convolutions, matmuls and elementwise/reduction work. Convolutions
    are split into forward, input-gradient and kernel-gradient by the named scopes of
    `ddpm_jax/conv.py` (the im2col kernel gradient's matmul included). Their FLOPs are 2 · output size · window size · input features (zeros
    inserted by an input dilation included).
    """
    import math
    import re

    instruction = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(\S+)\s[^=]*?([a-z][\w\-]*)\(")
    computation = re.compile(r"^\s*(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
    opcodes: dict[str, str] = {}
    shapes: dict[str, list[int]] = {}
    calls: dict[str, str] = {}
    bodies: dict[str, set[str]] = {}  # computation → opcodes in it
    conv_lines: list[tuple[str, str, str]] = []  # (computation, name, line)
    current = ""
    for line in hlo_text.splitlines():
        match = computation.match(line)
        if match and "=" not in line.split("{")[0]:
            current = match.group(1)
            bodies[current] = set()
            continue
        match = instruction.match(line)
        if not match:
            continue
        name, shape, opcode = match.groups()
        opcodes[name] = opcode
        bodies.setdefault(current, set()).add(opcode)
        shape_dims = re.search(r"\[([\d,]+)\]", shape)
        if shape_dims:
            shapes[name] = [int(d) for d in shape_dims.group(1).split(",")]
        target = re.search(r"calls=%?([\w.\-]+)", line)
        if target:
            calls[name] = target.group(1)
        if opcode == "convolution" or (opcode == "dot" and "conv_kernel_gradient" in line):
            conv_lines.append((current, name, line))

    convs: dict[str, tuple[str, float]] = {}  # conv instruction or its computation → (kind, flops)
    for comp, name, line in conv_lines:
        op_name = re.search(r'op_name="([^"]*)"', line)
        operands = re.search(r"convolution\(%?([\w.\-]+), %?([\w.\-]+)\)", line)
        window = re.search(r"size=([\dx]+)", line)
        labels = re.search(r"dim_labels=\w+_(\w+)->", line)
        flops = 0.0
        contracting = re.search(r"lhs_contracting_dims=\{([\d,]+)\}", line)
        lhs = re.search(r"dot\(%?([\w.\-]+),", line)
        if contracting and lhs and name in shapes and lhs.group(1) in shapes:  # im2col matmul
            flops = 2.0 * math.prod(shapes[name]) * math.prod(
                shapes[lhs.group(1)][int(d)] for d in contracting.group(1).split(","))
        elif operands and window and labels and name in shapes and operands.group(2) in shapes:
            in_features = shapes[operands.group(2)][labels.group(1).index("i")]
            taps = math.prod(int(v) for v in window.group(1).split("x"))
            flops = 2.0 * math.prod(shapes[name]) * taps * in_features
        convs[name] = convs[comp] = (_conv_kind(op_name.group(1) if op_name else ""), flops)

    result: dict[str, tuple[str, float]] = {}
    for name, opcode in opcodes.items():
        callee = calls.get(name, "")
        if name in convs or callee in convs:
            result[name] = convs.get(name) or convs[callee]
        elif opcode == "dot" or "dot" in bodies.get(callee, set()):
            result[name] = ("dot", 0.0)
        elif opcode == "fusion":
            result[name] = ("fusion (elementwise/reduce)", 0.0)
        else:
            result[name] = (opcode, 0.0)
    return result


def op_time_by_category(events: list[dict], ops: dict[str, tuple[str, float]]
                        ) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """Seconds per instruction, and seconds and GFLOP per category, from trace events.

    Every event is one execution of an instruction: on each device, and on each iteration of
    the `steps_per_call` loop. FLOPs are counted per execution, since `hlo_ops` has those of
    one execution (on one device, loop body once).
    """
    per_op: dict[str, float] = {}
    by_category: dict[str, dict[str, float]] = {}
    for event in events:
        op = (event.get("args") or {}).get("hlo_op")
        if not (op and event.get("ph") == "X"):
            continue
        seconds = event["dur"] * 1e-6
        per_op[op] = per_op.get(op, 0.0) + seconds
        category, flops = ops.get(op, ("other", 0.0))
        entry = by_category.setdefault(category, {"s": 0.0, "gflop": 0.0})
        entry["s"] += seconds
        entry["gflop"] += flops / 1e9
    return per_op, by_category


def profile_ops(run: Callable[[], Any], log_dir: str, hlo_text: str, top: int = 12
                ) -> dict[str, Any]:
    """Runs `run()` under the JAX profiler and sums XLA:CPU's per-instruction events.

    Returns the summed op time by category and the `top` most expensive instructions. Events
    of independent instructions may overlap in time, so shares are of summed op time.
    """
    import glob
    import gzip

    import jax

    os.makedirs(log_dir, exist_ok=True)
    with open(os.path.join(log_dir, "hlo.txt"), "w") as f:  # the op names of the trace
        f.write(hlo_text)
    jax.profiler.start_trace(log_dir, create_perfetto_trace=True)
    start = time.perf_counter()
    run()
    wall = time.perf_counter() - start
    jax.profiler.stop_trace()
    path = max(glob.glob(os.path.join(log_dir, "**", "perfetto_trace.json.gz"), recursive=True),
               key=os.path.getmtime)
    with gzip.open(path) as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    ops = hlo_ops(hlo_text)
    per_op, by_category = op_time_by_category(events, ops)
    total = sum(per_op.values()) or 1.0
    for entry in by_category.values():
        entry["share"] = entry["s"] / total
        if entry["gflop"]:
            entry["gflop_per_s"] = entry["gflop"] / entry["s"]
        else:
            del entry["gflop"]
    return {
        "wall_s": wall,
        "op_time_s": total,
        "by_category": dict(sorted(by_category.items(), key=lambda kv: -kv[1]["s"])),
        "top_ops": [{"op": op, "category": ops.get(op, ("other", 0.0))[0], "s": s, "share": s / total}
                    for op, s in sorted(per_op.items(), key=lambda kv: -kv[1])[:top]],
        "trace": path,
    }
