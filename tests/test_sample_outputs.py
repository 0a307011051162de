"""`--mode=sample` outputs (issue #13, 2.4 and 3.3): a bad editing input stops with one error
line and creates no output folder; each distinct setting gets its own results folder (named by a
hash of the settings, which `settings.json` holds), so a second run with other settings never
replaces the first, and the same settings again rewrite the same files."""

import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from configs import digits
from ddpm_jax import sample_mode
from helpers import config_flags, override, save_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# configs/digits.py shrunk to seconds; the CLI gets the same overrides.
OVERRIDES = {"model.num_res_blocks": 1, "diffusion.num_timesteps": 20, "sample.batch_size": 16,
             "sample.num_samples": 16, "sample.progress_every": 5, "sample.ddim_steps": 4}


def small_digits_config():
    return override(digits.get_config(), OVERRIDES)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A checkpoint (step 1) of a freshly initialised small digits model."""
    path = str(tmp_path_factory.mktemp("sample_outputs") / "run")
    save_checkpoint(small_digits_config(), path)
    return path


def _listing(root):
    return sorted(os.path.relpath(os.path.join(d, n), root)
                  for d, dirs, names in os.walk(root) for n in dirs + names)


def _cli(workdir, *args):
    return subprocess.run(
        [sys.executable, "-m", "ddpm_jax.main", "--mode=sample", "--config",
         os.path.join(REPO, "configs", "digits.py"), f"--workdir={workdir}", *config_flags(OVERRIDES), *args],
        cwd=REPO, capture_output=True, text=True, timeout=600,
        env={**os.environ, "JAX_PLATFORMS": "cpu"})


def test_bad_editing_inputs_are_one_error_line_and_no_output_folder(workdir, tmp_path):
    empty = tmp_path / "empty.npz"
    empty.write_bytes(b"")
    good = tmp_path / "good.npz"
    np.savez(good, images=np.zeros((2, 8, 8, 1), np.uint8))
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(good.read_bytes()[:len(good.read_bytes()) // 2])
    cases = [
        (["--config.sample.task=img2img", f"--config.sample.input={empty}"],
         f"cannot read sample.input='{empty}' as .npz (EOFError"),
        (["--config.sample.task=img2img", f"--config.sample.input={truncated}"],
         f"cannot read sample.input='{truncated}' as .npz (BadZipFile"),
        ([f"--config.sample.task=interpolate", f"--config.sample.input={good}",
          f"--config.sample.input2={good}", "--config.sample.num_mix=0"],
         "sample.num_mix=0 must be ≥ 2"),
    ]
    before = _listing(workdir)
    for args, expected in cases:
        result = _cli(workdir, *args)
        assert result.returncode == 2, result.stderr[-2000:]
        errors = [line for line in result.stderr.splitlines() if line.startswith("error")]
        assert len(errors) == 1 and errors[0].startswith("error: ") and expected in errors[0], (
            errors)
        assert "Traceback" not in result.stderr
        assert _listing(workdir) == before  # no samples/ folder, nothing else either


def _sample(config, workdir, capsys):
    out_dir = sample_mode.write_samples(config, workdir)
    return out_dir, capsys.readouterr().out


def test_sampling_twice_with_other_settings_keeps_both_results(workdir, capsys):
    config = small_digits_config()
    first, _ = _sample(config, workdir, capsys)
    first_images = np.load(os.path.join(first, "samples.npz"))["images"]
    first_files = {name: open(os.path.join(first, name), "rb").read()
                   for name in os.listdir(first)}

    changes = [("num_samples", 8), ("batch_size", 8), ("seed", 3), ("method", "ddim"),
               ("clip_denoised", False)]
    folders = {first}
    for key, value in changes:
        config = small_digits_config()
        config.sample[key] = value
        out_dir, _ = _sample(config, workdir, capsys)
        assert out_dir not in folders, key
        folders.add(out_dir)
        settings = json.load(open(os.path.join(out_dir, "settings.json")))
        assert settings["sample"][key] == value and settings["step"] == 1
    config = small_digits_config()
    config.sample.method = "ddim"
    config.sample.ddim_steps = 2  # another DDIM setting: another folder again
    assert _sample(config, workdir, capsys)[0] not in folders

    # The first results are untouched, byte for byte.
    for name, content in first_files.items():
        assert open(os.path.join(first, name), "rb").read() == content, name
    # Same settings again: the same folder and the same results, said so.
    again, out = _sample(small_digits_config(), workdir, capsys)
    assert again == first and "already held" in out
    np.testing.assert_array_equal(np.load(os.path.join(again, "samples.npz"))["images"],
                                  first_images)
    # Options the generator does not read (an editing task's input) do not make a new folder.
    config = small_digits_config()
    config.sample.input = "unused.png"
    assert _sample(config, workdir, capsys)[0] == first


def test_a_results_folder_of_other_settings_is_never_overwritten(workdir, capsys):
    config = small_digits_config()
    config.sample.seed = 11
    out_dir, _ = _sample(config, workdir, capsys)
    settings_path = os.path.join(out_dir, "settings.json")
    settings = json.load(open(settings_path))
    settings["sample"]["seed"] = 12  # as if another setting had the same hash
    with open(settings_path, "w") as f:
        json.dump(settings, f)
    npz = open(os.path.join(out_dir, "samples.npz"), "rb").read()
    with pytest.raises(ValueError, match="exists but does not hold the results of these settings"):
        sample_mode.write_samples(config, workdir)
    assert open(os.path.join(out_dir, "samples.npz"), "rb").read() == npz


def test_editing_with_another_input_under_the_same_name_keeps_both(workdir, tmp_path, capsys):
    config = small_digits_config()
    config.sample.task, config.sample.t0 = "img2img", 0  # t0 = 0: the output is the input
    path = tmp_path / "digit.png"
    outputs = []
    for value in (40, 200):
        Image.fromarray(np.full((8, 8), value, np.uint8)).save(path)
        config.sample.input = str(path)
        out_dir, _ = _sample(config, workdir, capsys)
        outputs.append((out_dir, np.load(os.path.join(out_dir, "outputs.npz"))["output"]))
    (first, first_output), (second, second_output) = outputs
    assert first != second
    assert (first_output == 40).all() and (second_output == 200).all()
    assert len(glob.glob(os.path.join(workdir, "samples", "img2img_step00000001_seed0_t0_*"))
               ) == 2
