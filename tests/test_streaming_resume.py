"""Streaming data (`data.in_memory=False`, Grain) resumes exactly.

A run stopped mid-epoch by SIGTERM and resumed trains on exactly the examples, in exactly the
order, of an uninterrupted run, on one process and on two (each process's Grain iterator state
is saved with the checkpoint and restored). Also: the pixels equal the former tf.data
preprocessing, image folders stream, and data that cannot be streamed is one error line. The examples are identified by their pixels
(`streaming_data.id_image`); the run's config records each trained batch's ids.
"""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from ddpm_jax import input_pipeline
import streaming_data
from streaming_data import NUM_INDEXED, image_ids

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(REPO, "tests")
TIMEOUT_SECONDS = 900  # per run; uncached compiles on a loaded CPU
NUM_STEPS = 8  # 8 steps of 16 = 128 examples: 3.2 epochs of 40
STEPS_PER_CALL = 3  # calls end at 3, 6 and 8 (the last call is shorter: a new iterator)

# The runs' config: the tiny model on `indexed_images`, streamed; a wrapper around
# `parallel.to_global_array` appends each trained step's example ids (this process's rows) to
# a file, one line per step.
CONFIG_FILE = '''
import os, sys
sys.path.insert(0, {tests!r})
import numpy as np
import streaming_data
from helpers import tiny_config
from ddpm_jax import parallel

_to_global_array = parallel.to_global_array


def _recording(array, *args, **kwargs):
    if array.dtype == np.uint8:
        name = "ids_" + os.environ.get("JAX_PROCESS_ID", "0")
        with open(os.path.join({record_dir!r}, name), "a") as f:
            for step in streaming_data.image_ids(array):
                f.write(" ".join(map(str, step)) + "\\n")
    return _to_global_array(array, *args, **kwargs)


parallel.to_global_array = _recording


def get_config():
    config = tiny_config()
    config.data.name = "indexed_images"
    config.data.data_dir = {data_dir!r}
    config.data.in_memory = False
    config.training.num_steps = {num_steps}
    config.training.steps_per_call = {steps_per_call}
    config.training.checkpoint_every = 100
    return config
'''


@pytest.fixture(scope="module")
def indexed(tmp_path_factory) -> str:
    return streaming_data.prepare("indexed_images", str(tmp_path_factory.mktemp("tfds")))


def _data_config(name, data_dir, image_size=8, channels=1):
    from configs import default

    data = default.get_config().data
    data.name, data.data_dir, data.in_memory = name, data_dir, False
    data.image_size, data.channels = image_size, channels
    return data


def _ids(batches, count):
    return [image_ids(next(batches).images) for _ in range(count)]


def test_a_stream_restored_from_its_position_goes_on_with_the_next_example(indexed):
    stream = input_pipeline.open_stream(_data_config("indexed_images", indexed))
    uninterrupted = np.concatenate(_ids(input_pipeline.streaming_batches(
        stream, global_batch=16, steps_per_call=1, seed=0), 7))
    # Each epoch is a permutation of the 40 examples, and the next epoch a different one.
    order = uninterrupted.reshape(-1)
    assert sorted(order[:NUM_INDEXED]) == list(range(NUM_INDEXED))
    assert sorted(order[NUM_INDEXED:2 * NUM_INDEXED]) == list(range(NUM_INDEXED))
    assert not np.array_equal(order[:NUM_INDEXED], order[NUM_INDEXED:2 * NUM_INDEXED])

    first = input_pipeline.streaming_batches(stream, global_batch=16, steps_per_call=1, seed=0)
    batches = [next(first) for _ in range(3)]  # stopped at step 3, in the second epoch
    resumed = input_pipeline.streaming_batches(stream, global_batch=16, steps_per_call=2,
                                               seed=0, position=batches[-1].position)
    again = np.concatenate([image_ids(b.images) for b in batches] + _ids(resumed, 2))
    np.testing.assert_array_equal(again, uninterrupted)


def test_a_position_of_another_data_order_warns_and_starts_that_order_afresh(indexed, caplog):
    stream = input_pipeline.open_stream(_data_config("indexed_images", indexed))
    saved = next(input_pipeline.streaming_batches(stream, global_batch=16, steps_per_call=1,
                                                  seed=0)).position
    fresh = next(input_pipeline.streaming_batches(stream, global_batch=16, steps_per_call=1,
                                                  seed=1))
    resumed = next(input_pipeline.streaming_batches(stream, global_batch=16, steps_per_call=1,
                                                    seed=1, position=saved))
    np.testing.assert_array_equal(image_ids(resumed.images), image_ids(fresh.images))
    assert "belongs to another data order" in caplog.text


def _reference_tf_data(data_dir, size, channels):
    """The base's tf.data streaming preprocessing, written out here: TFDS's own decoding, then
    centre square, area resize with antialias, round, uint8; keyed by label (= index)."""
    import tensorflow as tf
    import tensorflow_datasets as tfds

    ds = tfds.builder("sized_photos", data_dir=data_dir).as_dataset(split="train")
    out = {}
    for example in ds:
        image = example["image"]
        if channels == 1:
            image = tf.image.rgb_to_grayscale(image)
        height, width = tf.shape(image)[0], tf.shape(image)[1]
        side = tf.minimum(height, width)
        image = tf.image.crop_to_bounding_box(image, (height - side) // 2, (width - side) // 2,
                                              side, side)
        image = tf.image.resize(image, [size, size], method="area", antialias=True)
        out[int(example["label"])] = tf.cast(tf.clip_by_value(tf.round(image), 0, 255),
                                             tf.uint8).numpy()
    return out


@pytest.mark.parametrize("channels", [3, 1])
def test_streamed_pixels_equal_the_tf_data_preprocessing(tmp_path, channels):
    grain_dir = streaming_data.prepare("sized_photos", str(tmp_path / "ar"))
    tf_dir = streaming_data.prepare("sized_photos", str(tmp_path / "tfr"), "tfrecord")
    reference = _reference_tf_data(tf_dir, 16, channels)
    stream = input_pipeline.open_stream(_data_config("sized_photos", grain_dir, 16, channels))
    batch = next(input_pipeline.streaming_batches(stream, global_batch=12, steps_per_call=1,
                                                  seed=0))
    assert sorted(batch.labels[0].tolist()) == list(range(streaming_data.NUM_PHOTOS))
    for image, label in zip(batch.images[0], batch.labels[0]):
        assert image.shape == (16, 16, channels)
        np.testing.assert_array_equal(image, reference[int(label)])


def _fails_with_one_line(config, workdir, capsys) -> str:
    """`modes.run_or_exit` exits 2 with one `error:` line and leaves no workdir behind."""
    from ddpm_jax import modes

    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        modes.run_or_exit("train", config, workdir)
    assert exit_info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("error: "), errors
    assert not os.path.exists(workdir)
    return errors[0]


def _streaming_config(data_dir):
    from helpers import tiny_config

    config = tiny_config()
    config.data.name, config.data.data_dir, config.data.in_memory = "indexed_images", data_dir, False
    return config


def test_tfrecord_data_is_one_error_naming_the_conversion(tmp_path, capsys):
    data_dir = streaming_data.prepare("indexed_images", str(tmp_path / "data"), "tfrecord")
    line = _fails_with_one_line(_streaming_config(data_dir), str(tmp_path / "run"), capsys)
    version_dir = os.path.join(data_dir, "indexed_images", "1.0.0")
    assert line == (
        f"error: TFDS indexed_images in {version_dir} is stored as tfrecord, "
        "but streaming (data.in_memory=False) reads ArrayRecord by index"
        f": convert it once with `tfds convert_format --dataset_version_dir={version_dir} "
        "--out_file_format=array_record` or prepare it again with `tfds build indexed_images "
        "--file_format=array_record`.")


def test_unprepared_data_is_one_error_naming_the_build(tmp_path, capsys):
    empty = str(tmp_path / "nothing")
    line = _fails_with_one_line(_streaming_config(empty), str(tmp_path / "run"), capsys)
    assert line == (
        f"error: TFDS indexed_images is not prepared in {empty}/indexed_images/1.0.0"
        "; prepare it with `tfds build indexed_images --file_format=array_record"
        f" --data_dir={empty}` or set --config.data.data_dir to where it is.")


def test_tfds_mock_data_streams(tmp_path):
    """`tfds.testing.mock_data` gives an ArrayRecord-like source of encoded images, so tests of
    streaming configs need no real data."""
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=24, data_dir=str(tmp_path)):
        stream = input_pipeline.open_stream(_data_config("mnist", str(tmp_path), 16, 3))
        batch = next(input_pipeline.streaming_batches(stream, global_batch=8, steps_per_call=2,
                                                      seed=0))
    assert batch.images.shape == (2, 8, 16, 16, 3) and batch.images.dtype == np.uint8
    assert batch.labels.shape == (2, 8) and batch.images.std() > 0
    # Grey repeated to RGB: the three channels are equal.
    np.testing.assert_array_equal(batch.images[..., 0], batch.images[..., 2])


def test_streaming_without_grain_is_one_error_naming_the_install(indexed, tmp_path, capsys,
                                                                 monkeypatch):
    monkeypatch.setitem(sys.modules, "grain", None)  # `import grain` raises ImportError
    line = _fails_with_one_line(_streaming_config(indexed), str(tmp_path / "run"), capsys)
    assert line == ("error: streaming data (data.in_memory=False) "
                    "is read with Grain, which is not installed: pip install grain"
                    " (or pip install 'ddpm_jax[streaming]').")


def test_an_image_folder_streams_the_pixels_it_has_in_memory(tmp_path):
    from PIL import Image

    folder = tmp_path / "photos"
    for index in range(10):
        os.makedirs(folder / f"class_{index % 2}", exist_ok=True)
        rng = np.random.default_rng(index)
        size = (12 + index, 9 + 2 * index)
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(
            folder / f"class_{index % 2}" / f"{index}.png")
    in_memory = input_pipeline.load_image_folder(str(folder), 8, 3)
    data = _data_config("imagefolder", "", 8, 3)
    data.folder = str(folder)
    stream = input_pipeline.open_stream(data)
    images = next(input_pipeline.streaming_batches(stream, global_batch=10, steps_per_call=1,
                                                   seed=0)).images[0]
    # The same images as the in-memory loader (same PIL preprocessing), in the epoch's order.
    as_bytes = sorted(image.tobytes() for image in images)
    assert as_bytes == sorted(image.tobytes() for image in in_memory.images)


# ---------------------------------------------------------------------------------------------
# SIGTERM mid-epoch and resume, on the command line.


def _env(devices: int, **extra) -> dict:
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={devices}"])
    env.update(JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1", PYTHONPATH=REPO)
    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        env.pop(name, None)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train(root, data_dir, name, processes: int, stop: bool) -> list[str]:
    """Runs (or resumes) the training in `root/name` on `processes` processes × 8/processes
    devices; `stop`: SIGTERM to every process while its first call compiles. Returns the
    logs."""
    record_dir = os.path.join(root, name + "_ids")
    os.makedirs(record_dir, exist_ok=True)
    config_file = os.path.join(root, name + "_config.py")
    with open(config_file, "w") as f:
        f.write(CONFIG_FILE.format(tests=TESTS, record_dir=record_dir, data_dir=data_dir,
                                   num_steps=NUM_STEPS, steps_per_call=STEPS_PER_CALL))
    command = [sys.executable, "-m", "ddpm_jax.main", "--config", config_file, "--workdir",
               os.path.join(root, name)]
    port = _free_port()
    extra = ({} if processes == 1 else
             # As in test_multihost: a warm cache on process 0 only would time gloo out.
             dict(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=processes,
                  JAX_ENABLE_COMPILATION_CACHE="false"))
    logs = [open(os.path.join(root, f"{name}_{time.monotonic_ns()}_{i}.log"), "w+")
            for i in range(processes)]
    runs = [subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, text=True,
                             env=_env(8 // processes, **extra, **(
                                 {"JAX_PROCESS_ID": i} if processes > 1 else {})))
            for i, log in enumerate(logs)]
    try:
        if stop:
            deadline = time.monotonic() + TIMEOUT_SECONDS
            for run, log in zip(runs, logs):
                while "compiling the train step" not in open(log.name).read():
                    assert run.poll() is None and time.monotonic() < deadline, \
                        open(log.name).read()[-3000:]
                    time.sleep(0.1)
            for run in runs:
                run.send_signal(signal.SIGTERM)
        for run in runs:
            run.wait(timeout=TIMEOUT_SECONDS)
    finally:
        for run in runs:
            if run.poll() is None:
                run.kill()
                run.wait()
    texts = [open(log.name).read() for log in logs]
    for run, text in zip(runs, texts):
        assert run.returncode == 0, text[-5000:]
    return texts


def _recorded(root, name, processes: int) -> np.ndarray:
    """[steps, processes, rows]: each process's trained example ids per step."""
    per_process = []
    for index in range(processes):
        with open(os.path.join(root, name + "_ids", f"ids_{index}")) as f:
            per_process.append([[int(x) for x in line.split()] for line in f if line.strip()])
    return np.asarray(per_process).transpose(1, 0, 2)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("streaming_runs"))


@pytest.fixture(scope="module")
def uninterrupted_one_process(root, indexed):
    _train(root, indexed, "whole_1", 1, stop=False)
    return _recorded(root, "whole_1", 1)


@pytest.mark.parametrize("processes", [1, 2])
def test_sigterm_mid_epoch_then_resume_trains_on_the_same_examples(root, indexed, processes,
                                                                   uninterrupted_one_process):
    name = f"stopped_{processes}"
    [*_, log] = _train(root, indexed, name, processes, stop=True)
    assert "Stopped by SIGTERM at step 3;" in log, log[-3000:]
    assert len(_recorded(root, name, processes)) == 3  # 48 examples: mid-way through epoch 2
    _train(root, indexed, name, processes, stop=False)
    resumed = _recorded(root, name, processes)
    # The uninterrupted run's order: one global order, of which process p of P holds positions
    # p, p + P, ... of each step's 16 (on one process, all of them in order). Two processes
    # uninterrupted are not run again here: that costs two more uncached compiles and equals
    # this by construction (`input_pipeline.streaming_batches`).
    one = uninterrupted_one_process[:, 0, :]
    uninterrupted = np.stack([one[:, p::processes] for p in range(processes)], axis=1)
    assert resumed.shape == uninterrupted.shape == (NUM_STEPS, processes, 16 // processes)
    np.testing.assert_array_equal(resumed, uninterrupted)
    # Every epoch of 40 uses each example once.
    order = one.reshape(-1)
    assert sorted(order[:NUM_INDEXED]) == sorted(order[NUM_INDEXED:2 * NUM_INDEXED]) == list(
        range(NUM_INDEXED))
