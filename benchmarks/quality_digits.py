"""Sample quality of a digits run, judged by a classifier trained on the real digits.

    python benchmarks/quality_digits.py --config configs/digits.py --workdir runs/digits
    python benchmarks/quality_digits.py --config configs/digits_cond.py --workdir runs/digits_cond \
        --guidance_scale 3 --method ddim

Generates `--num_samples` digits with the run's EMA weights, classifies them with an RBF SVM
fitted on scikit-learn's real digits (half for training, half held out), and prints one JSON
line: the class histogram, the mean classifier confidence on the samples, and the same
confidence on held-out real digits for comparison. Recognisable, diverse digits give a
confidence near the real digits' and a roughly flat histogram.

It also reports `frechet_distance`: the Fréchet distance between the samples and the held-out
real digits in the 64-unit hidden layer of a small MLP classifier fitted on the training half
(the digits' analogue of FID), next to `frechet_distance_real`, the same distance of as many
real training-half digits (at most the 898 there; `frechet_real_count`), for scale: lower is
better, and a model at the real-vs-real value draws digits as varied and typical as the real ones.

For a class-conditional run (`model.num_classes = 10`) sample i is requested as digit i mod 10,
drawn with classifier-free guidance `--guidance_scale` (default: the config's), and the line
adds `guided_accuracy`: the fraction the classifier assigns to the requested digit, overall and
per digit.
"""

from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from ddpm_jax import checkpointing, generate, images, metrics, parallel  # noqa: E402

FLAGS = flags.FLAGS


def split_digits(seed: int = 0):
    """scikit-learn's real 8x8 digits in [0, 1], split in halves: x_train, x_test, y_train, y_test."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    return train_test_split(digits.data / 16.0, digits.target, test_size=0.5,
                            random_state=seed, stratify=digits.target)


def fit_feature_network(x_train: np.ndarray, y_train: np.ndarray, seed: int = 0):
    """A 64-unit MLP classifier on the training half; its hidden layer is the feature space."""
    from sklearn.neural_network import MLPClassifier

    return MLPClassifier(hidden_layer_sizes=(64,), max_iter=2000, random_state=seed).fit(
        x_train, y_train)


def hidden_features(network, pixels: np.ndarray) -> np.ndarray:
    """ReLU activations of the network's hidden layer for [n, 64] pixels in [0, 1]."""
    return np.maximum(pixels @ network.coefs_[0] + network.intercepts_[0], 0.0)


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    return metrics.fid_from_stats(*metrics.stats_from_features(features_a),
                                  *metrics.stats_from_features(features_b))


def frechet_report(samples_uint8: np.ndarray, seed: int = 0) -> dict:
    """Fréchet distance of the samples to the held-out real digits, and real vs real for scale."""
    x_train, x_test, y_train, _ = split_digits(seed)
    network = fit_feature_network(x_train, y_train, seed)
    pixels = samples_uint8.reshape(len(samples_uint8), -1).astype(np.float64) / 255.0
    held_out = hidden_features(network, x_test)
    count = min(len(pixels), len(x_train))
    real = np.random.default_rng(seed).permutation(len(x_train))[:count]
    return {"frechet_distance": frechet_distance(hidden_features(network, pixels), held_out),
            "frechet_distance_real": frechet_distance(hidden_features(network, x_train[real]),
                                                      held_out),
            "frechet_real_count": count}


def fit_digit_classifier(seed: int = 0):
    """An RBF SVM on half of the real 8x8 digits; returns it and its held-out accuracy/confidence."""
    from sklearn.svm import SVC

    x_train, x_test, y_train, y_test = split_digits(seed)
    classifier = SVC(gamma="scale", probability=True, random_state=seed).fit(x_train, y_train)
    probabilities = classifier.predict_proba(x_test)
    return classifier, {
        "real_heldout_accuracy": float(np.mean(classifier.classes_[probabilities.argmax(1)]
                                               == y_test)),
        "real_heldout_mean_confidence": float(probabilities.max(1).mean()),
    }


def classify(classifier, samples_uint8: np.ndarray) -> dict:
    """Class histogram and mean confidence of 8x8 grey samples (uint8)."""
    features = samples_uint8.reshape(len(samples_uint8), -1).astype(np.float64) / 255.0
    probabilities = classifier.predict_proba(features)
    predicted = classifier.classes_[probabilities.argmax(1)]
    return {
        "class_histogram": np.bincount(predicted, minlength=10).tolist(),
        "mean_confidence": float(probabilities.max(1).mean()),
        "predicted": predicted,
    }


def main(argv):
    del argv
    config = FLAGS.config
    conditional = config.model.num_classes > 1
    if FLAGS.guidance_scale is not None:
        config.sample.guidance_scale = FLAGS.guidance_scale
    requested = (np.arange(FLAGS.num_samples) % config.model.num_classes).astype(np.int32) \
        if conditional else None
    generate.requested_labels(config)  # one clear error for guidance on an unconditional run
    mesh = parallel.make_mesh()
    graphdef, params, step = checkpointing.load_ema_params(config, FLAGS.workdir, mesh)
    start = time.time()
    batches = generate.batches(graphdef, params, config, mesh, FLAGS.num_samples,
                                jax.random.key(FLAGS.seed), method=FLAGS.method,
                                labels=requested)
    samples = np.concatenate([images.to_uint8(s) for s, _ in batches])
    seconds = time.time() - start
    classifier, reference = fit_digit_classifier()
    result = classify(classifier, samples)
    result.update(frechet_report(samples))
    predicted = result.pop("predicted")
    if conditional:
        correct = predicted == requested
        result["guidance_scale"] = float(config.sample.guidance_scale)
        result["guided_accuracy"] = float(np.mean(correct))
        result["guided_accuracy_per_class"] = [
            round(float(np.mean(correct[requested == c])), 3)
            for c in range(config.model.num_classes)]
    print(json.dumps({"benchmark": "quality_digits", "checkpoint_step": step,
                      "num_samples": len(samples), "method": FLAGS.method,
                      "sampling_seconds": round(seconds, 1), **result, **reference}))


def define_flags() -> None:
    """The command line's flags; defined only when run as a script, so that tests can import
    the functions next to other modules' absl flags."""
    config_flags.DEFINE_config_file("config", "configs/digits.py", "The run's config.")
    flags.DEFINE_string("workdir", None, "The trained digits run.", required=True)
    flags.DEFINE_integer("num_samples", 1000, "How many digits to generate.")
    flags.DEFINE_string("method", "ancestral", "ancestral or ddim.")
    flags.DEFINE_integer("seed", 1, "Sampling seed.")
    flags.DEFINE_float("guidance_scale", None, "Conditional runs: classifier-free guidance w "
                       "(default: the config's sample.guidance_scale).")


if __name__ == "__main__":
    define_flags()
    app.run(main)
