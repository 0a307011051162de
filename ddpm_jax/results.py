"""The folders `--mode=sample` writes its results to: one per distinct settings under
`workdir/samples/`, named by a hash of the settings and holding them in `settings.json`, so
that a run with other settings never replaces earlier results (`output_dir`); and the settings
that decide a generated (`generate_settings`) or edited (`task_settings`) result.
"""

from __future__ import annotations

import hashlib
import json
import os

import ml_collections

from ddpm_jax import generate


# Fields of `config.sample` that only editing tasks read; `--mode=sample` generation ignores them.
EDIT_ONLY_FIELDS = ("task", "input", "input2", "mask", "t0", "strength", "num_mix",
                    "denoise_steps", "compose_labels", "anagram_flip", "hybrid_kernel_size",
                    "hybrid_sigma")
DDIM_FIELDS = ("ddim_steps", "ddim_eta", "ddim_skip")
SOLVER_FIELDS = ("solver_order", "timestep_spacing")
# What each method reads of `config.sample` beyond the common fields (num_steps as resolved).
METHOD_FIELDS = {"ancestral": ("progress_every",), "ddim": DDIM_FIELDS + ("num_steps",),
                 "dpm_solver": SOLVER_FIELDS + ("num_steps",),
                 "unipc": SOLVER_FIELDS + ("num_steps",)}
SETTINGS_FILE = "settings.json"


# How the editing tasks key their randomness (`edit_mode.run_task`).
TASK_KEYING = "key(sample.seed) for the whole batch, on one device"


def output_settings(config, step: int, sample: dict,
                    keying: str = generate.SAMPLE_KEYING) -> dict:
    """What decides a `--mode=sample` result: the checkpoint step, how its randomness is keyed
    (generated samples by their index, `generate.SAMPLE_KEYING`, so not by the device count or
    batch size), the model and diffusion configs and the given `config.sample` fields. Fields
    not known to be irrelevant are kept, so a new field can only make a new folder, never an
    overwrite."""
    return {"step": int(step), "keying": keying, "sample": sample,
            "model": config.model.to_dict(), "diffusion": config.diffusion.to_dict(),
            "data": {"image_size": config.data.image_size, "channels": config.data.channels}}


def method_settings(sample: dict) -> dict:
    """`sample` (a `config.sample` dict) without the fields of other methods, with num_steps as
    the method resolves it (so the old name ddim_steps and num_steps give the same folder).
    Ancestral settings read as before the solvers existed."""
    method = sample["method"]
    other = {field for fields in METHOD_FIELDS.values() for field in fields}
    out = {k: v for k, v in sample.items() if k not in other - set(METHOD_FIELDS[method])}
    if method != "ancestral":
        out["num_steps"] = generate.chain_method(ml_collections.ConfigDict(sample)).num_steps
        out.pop("ddim_steps", None)
    return out


def generate_settings(config, step: int) -> dict:
    sample = {k: v for k, v in config.sample.to_dict().items() if k not in EDIT_ONLY_FIELDS}
    return output_settings(config, step, method_settings(sample))


def _canonical(settings: dict) -> str:
    return json.dumps(settings, sort_keys=True, default=str)


def output_dir(workdir: str, prefix: str, settings: dict) -> tuple[str, bool]:
    """(`workdir/samples/<prefix>_<hash>`, whether it already holds these settings' results).

    One folder per distinct settings, named by a hash of them, with the settings in
    `settings.json`: a run with other settings never replaces earlier results, the same settings
    again give the same folder (and, being deterministic, the same files). A folder of that name
    with other (or no) settings is refused, not overwritten."""
    from etils import epath  # local paths and gs:// alike, as files.atomic_write writes them

    digest = hashlib.sha256(_canonical(settings).encode()).hexdigest()[:10]
    path = os.path.join(workdir, "samples", f"{prefix}_{digest}")
    if not epath.Path(path).exists():
        return path, False
    try:
        saved = json.loads(epath.Path(path, SETTINGS_FILE).read_text())
        same = _canonical(saved) == _canonical(settings)
    except (OSError, ValueError):
        same = False
    if not same:
        raise ValueError(f"{path} exists but does not hold the results of these settings (its "
                         f"{SETTINGS_FILE} is missing or differs); move it away or use another "
                         "--workdir.")
    return path, True


def write_settings(out_dir: str, settings: dict) -> None:
    from ddpm_jax import files

    files.save_json(os.path.join(out_dir, SETTINGS_FILE), settings)


def report_written(what: str, out_dir: str, existed: bool) -> None:
    if existed:
        print(f"{out_dir} already held {what} for these settings; rewrote the same results")
    else:
        print(f"wrote {what} to {out_dir}")


def task_settings(config, inputs, step: int) -> dict:
    """`output_settings` for an editing task (`edit_mode.TaskInputs` `inputs`): the
    `config.sample` fields the task reads (t0 as resolved), and the sha256 of each input file,
    whose contents may change under the same name."""
    from ddpm_jax.inception import _sha256

    sc, task = config.sample, config.sample.task
    unused = {"num_samples", "batch_size", "progress_every", "t0", "strength"}
    unused |= {"input2", "num_mix"} if task != "interpolate" else set()
    unused |= {"mask"} if task != "inpaint" else set()
    unused |= {"denoise_steps"} if task != "denoise" else set()
    sample = sc.to_dict()
    if task == "denoise" or sc.method == "ancestral":  # as before other methods existed
        unused |= {"method", *(f for fields in METHOD_FIELDS.values() for f in fields)}
    else:
        sample = method_settings(sample)
        sample["num_steps"] = generate.chain_method(  # as run from t0
            sc, start=inputs.t0, num_timesteps=config.diffusion.num_timesteps).num_steps
    sample = {k: v for k, v in sample.items() if k not in unused}
    if task == "denoise":
        sample["denoise_steps"] = inputs.steps
    else:
        sample["t0"] = inputs.t0
    names = ["input"] + (["input2"] if task == "interpolate" else []) + (
        ["mask"] if task == "inpaint" else [])
    sample["sha256"] = {name: _sha256(sc[name]) for name in names}
    return output_settings(config, step, sample, keying=TASK_KEYING)
