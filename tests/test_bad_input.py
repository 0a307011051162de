"""Every row of the README's "When something goes wrong" table: the command fails with exit
status 2 and exactly one `error:` line naming the problem, and the workdir is left byte for byte
as it was (or not created at all)."""

import hashlib
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from ddpm_jax import modes
from helpers import tiny_config, trained_workdir

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _snapshot(root):
    """Every file and directory below `root` with its size, mtime and content hash."""
    if not os.path.exists(root):
        return None
    entries = []
    for directory, dirs, names in os.walk(root):
        for name in dirs:
            path = os.path.join(directory, name)
            entries.append((os.path.relpath(path, root), "dir", os.stat(path).st_mtime_ns))
        for name in names:
            path = os.path.join(directory, name)
            with open(path, "rb") as f:
                digest = hashlib.sha256(f.read()).hexdigest()
            stat = os.stat(path)
            entries.append((os.path.relpath(path, root), stat.st_size, stat.st_mtime_ns, digest))
    return sorted(entries, key=str)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return trained_workdir(tmp_path_factory)


def _set(**overrides):
    def change(config):
        for dotted, value in overrides.items():
            section, key = dotted.split("__")
            config[section][key] = value
    return change


def _untyped(**overrides):
    """Like _set, for values a config file can hold but a typed override would refuse."""
    import ml_collections

    def change(config):
        for dotted, value in overrides.items():
            section, key = dotted.split("__")
            config[section] = ml_collections.ConfigDict({**config[section].to_dict(), key: value})
    return change


# (id, mode, config change, workdir: "fresh" | "trained" | "file", extra kwargs, expected message
# part)
IN_PROCESS_ROWS = [
    ("batch_not_divisible", "train", _set(training__batch_size=12), "fresh", {},
     "training.batch_size=12 is not divisible by the 8 devices of the data mesh; set "
     "--config.training.batch_size to a multiple of 8."),
    ("image_size_model_cannot_take", "train", _set(data__image_size=9), "fresh", {},
     "data.image_size=9 cannot be halved 1 times by model.ch_mult=(1, 2); use an image size "
     "divisible by 2."),
    ("attention_at_missing_resolution", "train", _set(model__attn_resolutions=(16,)), "fresh", {},
     "model.attn_resolutions=(16,): 16 is not a resolution of this UNet (8, 4)"),
    ("unknown_dataset", "train", _set(data__name="cifar100000"), "fresh", {},
     "unknown dataset data.name='cifar100000' (DatasetNotFoundError); use a TFDS name"),
    ("empty_image_folder", "train", None, "fresh", {"folder": "empty"},
     "has no images (.png, .jpg, .jpeg, .bmp, .webp, .tif, .tiff); point --config.data.folder at "
     "a folder that has some."),
    ("unreadable_images_in_folder", "train", None, "fresh", {"folder": "corrupt"},
     "file(s) in data.folder="),
    ("image_folder_missing", "train", None, "fresh", {"folder": "missing"},
     "is not a directory; set --config.data.folder to a folder of PNG/JPEG images."),
    ("dataset_smaller_than_a_batch", "train", _set(training__batch_size=4096), "fresh", {},
     "the dataset 'digits' has 1797 images, fewer than one batch of training.batch_size=4096; "
     "lower --config.training.batch_size."),
    ("workdir_of_another_config", "train", _set(data__image_size=16, model__attn_resolutions=()),
     "trained", {}, "was written with another config (data.image_size: checkpoint 8 vs now 16"),
    ("resume_with_changed_model_shape", "train", _set(model__ch=64), "trained", {},
     "was written with another config (model.ch: checkpoint 32 vs now 64); use a new --workdir "
     "or the original config."),
    ("missing_inception_weights", "eval",
     _set(eval__inception_weights="/nonexistent/pt_inception-2015-12-05-6726825d.pth"),
     "trained", {}, "eval.inception_weights='/nonexistent/pt_inception-2015-12-05-6726825d.pth' "
     "does not exist; point --config.eval.inception_weights at the file"),
    ("inception_weights_not_a_torch_file", "eval",
     _set(eval__inception_weights=os.path.join(REPO, "pyproject.toml")), "trained", {},
     "pyproject.toml as a torch.save'd state dict (UnpicklingError: invalid load key, '['.)"),
    ("unknown_mode", "paint", None, "trained", {},
     "--mode='paint' is unknown; use one of train, sample, eval, info."),
    ("no_workdir", "train", None, None, {},
     "--mode=train needs --workdir (where checkpoints and outputs go)."),
    ("unknown_sample_method", "sample", _set(sample__method="plms"), "trained", {},
     "sample.method='plms' is unknown; set --config.sample.method to one of ancestral, ddim, "
     "dpm_solver, unipc."),
    ("solver_order_out_of_range", "sample", _set(sample__method="dpm_solver",
                                                 sample__solver_order=4), "trained", {},
     "sample.solver_order=4 must be in [1, 3]; set --config.sample.solver_order."),
    ("unknown_timestep_spacing", "sample", _set(sample__method="dpm_solver",
                                                sample__timestep_spacing="karras"), "trained", {},
     "sample.timestep_spacing='karras' is unknown; set --config.sample.timestep_spacing to one "
     "of linspace, leading, trailing, logsnr."),
    ("solver_steps_beyond_the_schedule", "sample", _set(sample__method="dpm_solver",
                                                        sample__num_steps=25), "trained", {},
     "sample.num_steps=25 must be 0 (the method's default) or in [1, "
     "diffusion.num_timesteps=20]; set --config.sample.num_steps."),
    ("solver_steps_the_spacing_cannot_take", "sample",
     _set(sample__method="dpm_solver", sample__num_steps=15), "trained", {},
     "sample.num_steps=15 with sample.timestep_spacing=logsnr: num_steps=15 with spacing "
     "'logsnr' repeats timesteps of the 20-step schedule; use fewer steps or another spacing"),
    ("step_count_for_the_ancestral_sampler", "sample", _set(sample__num_steps=5), "trained", {},
     "sample.num_steps=5 is for ddim, dpm_solver and unipc; the ancestral sampler takes all "
     "diffusion.num_timesteps steps."),
    ("solver_steps_beyond_an_editing_start", "sample",
     _set(sample__task="img2img", sample__method="dpm_solver", sample__num_steps=5,
          sample__t0=3), "trained", {"npz": "good"},
     "sample.num_steps=5 does not fit sample.method=dpm_solver from paper step 3: it takes "
     "1..2 model calls; lower --config.sample.num_steps or start later (sample.t0)."),
    ("unknown_grid_method", "train", _set(training__grid_method="plms"), "fresh", {},
     "training.grid_method='plms' is unknown; set --config.training.grid_method to one of "
     "sample, ancestral, ddim, dpm_solver, unipc."),
    ("unknown_clip_mode", "train", _set(training__clip_mode="layer"), "fresh", {},
     "training.clip_mode='layer' is unknown; set --config.training.clip_mode to one of "
     "group, per_device, global."),
    ("unknown_beta_schedule", "train", _set(diffusion__beta_schedule="sigmoid"), "fresh", {},
     "diffusion.beta_schedule='sigmoid' is unknown"),
    ("unknown_var_type", "sample", _set(diffusion__var_type="fixed"), "trained", {},
     "diffusion.var_type='fixed' is unknown"),
    ("zero_num_steps", "train", _set(training__num_steps=0), "fresh", {},
     "training.num_steps=0 must be ≥ 1; set --config.training.num_steps."),
    ("zero_learning_rate", "train", _set(training__lr=0.0), "trained", {},
     "training.lr=0.0 must be > 0; set --config.training.lr."),
    ("steps_per_call_below_1", "train", _set(training__steps_per_call=0), "fresh", {},
     "training.steps_per_call=0 must be ≥ 1; set --config.training.steps_per_call."),
    ("checkpoint_step_missing", "sample", None, "trained", {"checkpoint": 7},
     "--checkpoint=7 is not in"),
    ("train_checkpoint_step_missing", "train", None, "trained", {"checkpoint": 7},
     "--checkpoint=7 is not in"),
    ("sample_without_checkpoint", "sample", None, "fresh", {},
     "; train first (--mode=train) or convert released weights (python -m ddpm_jax.convert)."),
    ("empty_npz_input", "sample", _set(sample__task="img2img"), "trained", {"npz": "empty"},
     "as .npz (EOFError: No data left in file); the file is empty, truncated or not an .npz"),
    ("truncated_npz_input", "sample", _set(sample__task="img2img"), "trained",
     {"npz": "truncated"}, "as .npz (BadZipFile: File is not a zip file); the file is empty"),
    ("interpolate_with_num_mix_0", "sample", _set(sample__task="interpolate", sample__num_mix=0),
     "trained", {"npz": "good"}, "sample.num_mix=0 must be ≥ 2 (the mixing weights"),
    ("setting_of_the_wrong_type", "train", _untyped(model__ch=32.0), "fresh", {},
     "model.ch=32.0 must be an integer ≥ 1; set --config.model.ch."),
    ("flag_that_is_not_a_bool", "train", _untyped(data__random_flip=1), "fresh", {},
     "data.random_flip=1 must be True or False; set --config.data.random_flip."),
    ("infinite_number", "train", _set(training__lr=float("inf")), "fresh", {},
     "training.lr=inf must be a finite number > 0; set --config.training.lr."),
    ("count_below_1", "train", _set(model__num_res_blocks=0), "fresh", {},
     "model.num_res_blocks=0 must be ≥ 1; set --config.model.num_res_blocks."),
    ("tuple_entry_below_1", "train", _set(model__ch_mult=(1, 0)), "fresh", {},
     "model.ch_mult=(1, 0) must be a tuple of integers ≥ 1; set --config.model.ch_mult."),
    ("rate_outside_0_1", "train", _set(training__adam_b2=1.0), "fresh", {},
     "training.adam_b2=1.0 must be in [0, 1); set --config.training.adam_b2."),
    ("negative_size", "eval", _set(eval__batch_size=0), "trained", {},
     "eval.batch_size=0 must be ≥ 1; set --config.eval.batch_size."),
    ("negative_where_0_is_off", "sample", _set(sample__progress_every=-1), "trained", {},
     "sample.progress_every=-1 must be ≥ 0 (0 = off); set --config.sample.progress_every."),
    ("start_step_below_minus_1", "sample", _set(sample__t0=-2), "trained", {},
     "sample.t0=-2 must be ≥ -1 (-1 = from sample.strength); set --config.sample.t0."),
    ("denoise_step_outside_the_chain", "sample", _set(sample__task="denoise"), "trained", {},
     "sample.denoise_steps: step 50 is outside 0..19."),
    ("clip_group_that_does_not_divide_the_batch", "train", _set(training__clip_group_size=12),
     "fresh", {}, "training.clip_group_size=12 must divide training.batch_size=16; set "
     "--config.training.clip_group_size to a divisor of the batch (16 in the paper)."),
    ("profile_window_backwards", "train", _set(training__profile_steps=(5, 2)), "fresh", {},
     "training.profile_steps=(5, 2) must be (start, end) with 1 ≤ start ≤ end, or () for none; "
     "set --config.training.profile_steps."),
    ("guidance_when_training_an_unconditional_model", "train",
     _set(sample__guidance_scale=3.0), "fresh", {},
     "sample.guidance_scale=3.0 needs a class-conditional model, but model.num_classes=0"),
    ("composed_task_on_an_unconditional_model", "sample",
     _set(sample__task="anagram", sample__compose_labels="6,9"), "trained", {},
     "sample.task=anagram needs a class-conditional model, but model.num_classes=0; use a model "
     "trained with --config.model.num_classes=C (e.g. configs/digits_cond.py)."),
    ("composed_task_without_two_classes", "sample",
     _set(model__num_classes=10, sample__guidance_scale=3.0, sample__task="hybrid",
          sample__compose_labels="6"), "trained", {},
     "sample.compose_labels='6' must be two classes 'c1,c2' for sample.task=hybrid, e.g. "
     "--config.sample.compose_labels=6,9."),
    ("hybrid_kernel_of_even_size", "sample",
     _set(model__num_classes=10, sample__guidance_scale=3.0, sample__task="hybrid",
          sample__compose_labels="6,9", sample__hybrid_kernel_size=4), "trained", {},
     "sample.hybrid_kernel_size=4 must be odd and below 16 (twice data.image_size); set "
     "--config.sample.hybrid_kernel_size."),
    ("unknown_sampler_in_the_eval_list", "eval", _set(eval__samplers="ddim:5,plms:20"),
     "trained", {}, "eval.samplers entry 'plms:20': method 'plms' is unknown; use one of "
     "ancestral, ddim, dpm_solver, unipc, e.g. "
     "--config.eval.samplers=ancestral:1000,ddim:50,dpm_solver:20,unipc:10:3."),
    ("ancestral_step_count_in_the_eval_list", "eval", _set(eval__samplers="ancestral:50"),
     "trained", {}, "eval.samplers entry 'ancestral:50': the ancestral sampler takes all 20 "
     "steps (diffusion.num_timesteps); write ancestral:20."),
    ("workdir_is_a_file", "train", None, "file", {},
     "is a file, not a directory; point --workdir at a directory (it is created if missing)."),
    ("sampling_into_a_workdir_that_is_a_file", "sample", None, "file", {},
     "is a file, not a directory; point --workdir at a directory (it is created if missing)."),
]


@pytest.mark.parametrize("row", IN_PROCESS_ROWS, ids=[row[0] for row in IN_PROCESS_ROWS])
def test_bad_input_in_process(row, trained, tmp_path, capsys):
    _, mode, change, which, extra, expected = row
    config = tiny_config()
    if "folder" in extra:
        config.data.name = "imagefolder"
        config.data.folder = str(tmp_path / extra["folder"])
        if extra["folder"] == "empty":
            os.makedirs(config.data.folder)
            (tmp_path / "empty" / "notes.txt").write_text("not an image")
        if extra["folder"] == "corrupt":
            os.makedirs(config.data.folder)
            for name in ("a.png", "b.jpg", "c.png", "d.png"):
                (tmp_path / "corrupt" / name).write_text("not an image")
    if "npz" in extra:
        good = tmp_path / "good.npz"
        np.savez(good, images=np.zeros((1, 8, 8, 1), np.uint8))
        data = {"empty": b"", "truncated": good.read_bytes()[:100], "good": good.read_bytes()}
        path = tmp_path / "input.npz"
        path.write_bytes(data[extra["npz"]])
        config.sample.input = config.sample.input2 = str(path)
    if change is not None:
        change(config)
    workdir = {"fresh": str(tmp_path / "run"), "trained": trained, "file": str(tmp_path / "run"),
               None: None}[which]
    if which == "file":
        (tmp_path / "run").write_text("not a directory")
    before = _snapshot(workdir) if workdir else None
    capsys.readouterr()

    with pytest.raises(SystemExit) as exit_info:
        modes.run_or_exit(mode, config, workdir, extra.get("checkpoint"))

    assert exit_info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("error: "), errors
    assert expected in errors[0]
    if workdir:
        assert _snapshot(workdir) == before  # None == None: a fresh workdir was not created
    if which == "file":
        assert (tmp_path / "run").read_text() == "not a directory"


FLAG_ROWS = [
    ("unknown_config_key", ["--config.model.chanels=64"],
     "error: --config.model.chanels: the config has no key 'chanels'; see configs/default.py "
     "for the keys."),
    ("config_value_of_wrong_type", ["--config.model.ch=abc"],
     "error: flag --config.model.ch=abc: invalid literal for int() with base 10: 'abc'"),
    ("not_a_number_on_the_command_line", ["--config.training.lr=nan"],
     "error: training.lr=nan must be a finite number > 0; set --config.training.lr."),
    ("missing_config_file", ["--config", "configs/nope.py"],
     "error: --config=configs/nope.py cannot be loaded ([Errno 2] No such file or directory: "
     "'configs/nope.py'); pass a config file such as configs/digits.py."),
]


@pytest.mark.parametrize("row", FLAG_ROWS, ids=[row[0] for row in FLAG_ROWS])
def test_bad_flags_on_the_command_line(row, tmp_path):
    _, args, expected = row
    workdir = str(tmp_path / "run")
    config_args = [] if "--config" in args else ["--config", "configs/digits.py"]
    result = subprocess.run(
        [sys.executable, "-m", "ddpm_jax.main", *config_args, *args, "--workdir", workdir],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error")]
    assert errors == [expected]
    assert "Traceback" not in result.stderr
    assert not os.path.exists(workdir)


def _readme_table_rows():
    with open(os.path.join(REPO, "README.md")) as f:
        text = f.read()
    section = text.split("## When something goes wrong", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ")]
    return rows[1:]  # below the header


# README rows whose faults need more than one command (two processes, damaged files, a
# read-only mount): (the row's mistake, a part of its message, the test file that asserts it).
ROWS_TESTED_ELSEWHERE = [
    ("results folder that holds other settings",
     "does not hold the results of these settings", "test_sample_outputs.py"),
    ("a chosen checkpoint whose files are damaged",
     "does not match the digest recorded when it was saved", "test_checkpoint_safety.py"),
    ("workdir that cannot be written", "cannot be written ({parent} is where it would be created)",
     "test_workdir.py"),
    ("a second training on one workdir", "is in use by another training", "test_workdir.py"),
    ("a second evaluation on one workdir", "is in use by another {what}", "test_workdir.py"),
    ("benchmark switch that does not exist",
     "is not MODULE.ATTR=VALUE of an existing ddpm_jax attribute", "test_conv_formulations.py"),
    ("streaming data stored as TFRecord", "but streaming (data.in_memory=False) reads "
     "ArrayRecord by index", "test_streaming_resume.py"),
    ("streaming data not prepared", "; prepare it with `tfds build", "test_streaming_resume.py"),
    ("streaming without Grain installed", "is read with Grain, which is not installed: pip "
     "install grain", "test_streaming_resume.py"),
]


def _example(part: str) -> str:
    """A tested message part with its placeholders as the README's example fills them."""
    return part.replace("{what}", "evaluation").replace("({parent}", "(/mnt/ro")


def _tested_messages():
    from test_tool_cli import CONVERT_ROWS, FID_STATS_ROWS

    messages = [re.sub(r"^error: ", "", row[-1]) for row in IN_PROCESS_ROWS + FLAG_ROWS]
    return messages + [row[-1] for row in CONVERT_ROWS + FID_STATS_ROWS]


def test_readme_table_lists_every_row_with_its_message():
    readme = "\n".join(_readme_table_rows()).replace("\\|", "|")
    # Each tested message appears in the table whole (modulo the table's code-span escaping).
    for row in IN_PROCESS_ROWS + FLAG_ROWS:
        assert re.sub(r"^error: ", "", row[-1]) in readme, row[0]


def test_every_readme_row_is_a_tested_message():
    tested = _tested_messages()
    for row in _readme_table_rows():
        cells = [cell.strip() for cell in re.split(r"(?<!\\)\|", row)[1:-1]]
        mistake, message = cells[0], cells[-1].replace("\\|", "|")
        elsewhere = [part for name, part, _ in ROWS_TESTED_ELSEWHERE if name == mistake]
        assert any(part in message for part in tested) or (
            elsewhere and _example(elsewhere[0]) in message), mistake
    for name, part, test_file in ROWS_TESTED_ELSEWHERE:
        with open(os.path.join(REPO, "tests", test_file)) as f:
            assert part in f.read(), (name, test_file)
