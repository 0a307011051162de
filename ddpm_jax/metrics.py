"""Inception Score and FID on the host, in float64 NumPy (docs/original.md §5).

Which Inception outputs to use:

* FID: the 2048-d `pool` features (the graph's `pool_3`), as TTUR, TF-GAN and the original repo.
* IS, paper numbers (Table 1/2, "OpenAI code", 10 splits, ±std): OpenAI's `inception_score.py`
  rebuilds the logits as `pool_3 @ W` from the `softmax/logits/MatMul` weights, i.e. WITHOUT the
  bias, and takes a softmax over all 1008 outputs -> pass `logits_unbiased`, `num_splits=10`.
* IS, the original repo's training monitor (`EvalWorker`): TF-GAN's `logits:0` (with bias),
  softmax over all 1008 outputs, one split and no std -> pass `logits`, `num_splits=1`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import scipy.special

from ddpm_jax import files


def _clamp_round_off(eigenvalues: np.ndarray) -> np.ndarray:
    """Zero the eigenvalues of a PSD matrix that are round-off: below max|w| * d * eps.

    This is the numerical-rank tolerance of `np.linalg.matrix_rank`. Without it, the square
    root turns ~1e-16 noise in the null space of a rank-deficient covariance (fewer samples
    than features) into ~1e-8 per direction, e.g. a visibly non-zero FID of a set with itself.
    """
    tolerance = np.max(np.abs(eigenvalues), initial=0.0) * eigenvalues.shape[0] * np.finfo(np.float64).eps
    return np.where(eigenvalues > tolerance, eigenvalues, 0.0)


def sqrtm_psd(matrix: np.ndarray) -> np.ndarray:
    """Symmetric PSD square root S^(1/2) = V diag(sqrt(w)) V^T from S = V diag(w) V^T.

    The input is symmetrised first; negative and round-off-sized eigenvalues are set to 0, so
    the result is real and symmetric.
    """
    matrix = np.asarray(matrix, dtype=np.float64)
    eigenvalues, eigenvectors = np.linalg.eigh((matrix + matrix.T) / 2)
    roots = np.sqrt(_clamp_round_off(eigenvalues))
    return (eigenvectors * roots) @ eigenvectors.T


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """Tr((S1 S2)^(1/2)) = Tr((S1^(1/2) S2 S1^(1/2))^(1/2)) = sum_i sqrt(lambda_i).

    S1 S2 has the same eigenvalues as the symmetric PSD matrix S1^(1/2) S2 S1^(1/2), whose
    eigenvalues lambda_i are real and >= 0 (round-off is clamped as in `sqrtm_psd`).
    """
    sqrt_sigma1 = sqrtm_psd(sigma1)
    middle = sqrt_sigma1 @ np.asarray(sigma2, dtype=np.float64) @ sqrt_sigma1
    eigenvalues = np.linalg.eigvalsh((middle + middle.T) / 2)
    return float(np.sum(np.sqrt(_clamp_round_off(eigenvalues))))


def fid_from_stats(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray
) -> float:
    """Frechet distance between N(mu1, S1) and N(mu2, S2) (Heusel et al. 2017):

    FID = ||mu1 - mu2||^2 + Tr(S1) + Tr(S2) - 2 Tr((S1 S2)^(1/2)).
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(
            f"statistics have different shapes: mu {mu1.shape} vs {mu2.shape}, "
            f"sigma {sigma1.shape} vs {sigma2.shape}"
        )
    mean_term = float(np.sum(np.square(mu1 - mu2)))
    trace_term = float(np.trace(sigma1) + np.trace(sigma2)) - 2.0 * trace_sqrt_product(sigma1, sigma2)
    return mean_term + trace_term


def stats_from_features(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased covariance Σ = (X - mu)^T (X - mu) / (n - 1) of features [n, d]."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"need features of shape [n >= 2, d], got {features.shape}")
    mu = features.mean(axis=0)
    centered = features - mu
    return mu, centered.T @ centered / (features.shape[0] - 1)


class FeatureStatsAccumulator:
    """Streaming mean / unbiased covariance over feature batches (Chan et al. pairwise update).

    Keeps n, the mean and M2 = sum (x - mean)(x - mean)^T in float64; merging a batch with mean
    m_b and scatter M2_b adds M2_b + delta delta^T n n_b / (n + n_b), delta = m_b - mean.
    """

    def __init__(self, dim: int):
        self.count = 0
        self.mean = np.zeros(dim, np.float64)
        self.scatter = np.zeros((dim, dim), np.float64)

    def update(self, features: np.ndarray) -> None:
        batch = np.asarray(features, dtype=np.float64)
        if batch.ndim != 2 or batch.shape[1] != self.mean.shape[0]:
            raise ValueError(f"expected features [n, {self.mean.shape[0]}], got {batch.shape}")
        n_batch = batch.shape[0]
        if n_batch == 0:
            return
        batch_mean = batch.mean(axis=0)
        centered = batch - batch_mean
        delta = batch_mean - self.mean
        total = self.count + n_batch
        self.scatter += centered.T @ centered + np.outer(delta, delta) * (self.count * n_batch / total)
        self.mean += delta * (n_batch / total)
        self.count = total

    def stats(self) -> tuple[np.ndarray, np.ndarray]:
        """(mu, unbiased sigma) of everything seen so far."""
        if self.count < 2:
            raise ValueError(f"need at least 2 feature vectors, got {self.count}")
        return self.mean.copy(), self.scatter / (self.count - 1)


def inception_score(
    logits_or_probs: np.ndarray, num_splits: int = 10, from_logits: bool = True
) -> tuple[float, float]:
    """Inception Score, OpenAI formula (Salimans et al. 2016).

    The N predictions are cut into `num_splits` contiguous parts
    [i N // splits, (i + 1) N // splits); per part, IS_i = exp(mean_x KL(p(y|x) || p(y))) with
    p(y) the part's mean prediction. Returns (mean_i IS_i, std_i IS_i) (population std, as
    np.std). `num_splits=1` is TF-GAN's classifier score (original repo's monitor).
    See the module docstring for which logits to pass.

    Args:
      logits_or_probs: [N, classes]; logits (softmax taken here, over all classes) or, with
        `from_logits=False`, probabilities (rows summing to 1; 0 log 0 = 0).
    """
    values = np.asarray(logits_or_probs, dtype=np.float64)
    if values.ndim != 2 or values.shape[0] < num_splits or num_splits < 1:
        raise ValueError(f"need [N >= num_splits, classes] predictions, got {values.shape}, splits {num_splits}")
    if from_logits:
        log_probs = values - scipy.special.logsumexp(values, axis=1, keepdims=True)
        probs = np.exp(log_probs)
    else:
        probs = values
        with np.errstate(divide="ignore"):
            log_probs = np.log(probs)

    n = values.shape[0]
    scores = []
    for i in range(num_splits):
        part = slice(i * n // num_splits, (i + 1) * n // num_splits)
        p_yx, log_p_yx = probs[part], log_probs[part]
        with np.errstate(divide="ignore", invalid="ignore"):
            # log p(y) from the log-probabilities, so it cannot underflow to -inf while some
            # p(y|x) is a positive denormal.
            log_p_y = scipy.special.logsumexp(log_p_yx, axis=0) - np.log(len(p_yx))
            # Terms with p(y|x) = 0 contribute 0 (p(y) = 0 only where every p(y|x) = 0).
            kl = np.where(p_yx > 0, p_yx * (log_p_yx - log_p_y), 0.0).sum(axis=1)
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores)), float(np.std(scores))


def save_stats(
    path: str | os.PathLike, mu: np.ndarray, sigma: np.ndarray, meta: Mapping[str, Any] | None = None
) -> None:
    """Write `mu`, `sigma` (float64), `meta` (JSON string) and, if in meta, `num_images` to an npz.

    The keys `mu` / `sigma` are TTUR's, so these files interchange with TTUR-style statistics.
    The file is written under a temporary name and renamed, and `path` is used verbatim.
    """
    path = Path(path)
    meta = dict(meta or {})
    arrays = {
        "mu": np.asarray(mu, np.float64),
        "sigma": np.asarray(sigma, np.float64),
        "meta": np.array(json.dumps(meta, sort_keys=True)),
    }
    if "num_images" in meta:
        arrays["num_images"] = np.array(int(meta["num_images"]), np.int64)
    files.save_npz(path, **arrays)


def load_stats(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Read (mu, sigma, meta) from `save_stats` files or TTUR-style npz files (meta then {})."""
    with np.load(path, allow_pickle=False) as data:
        if "mu" not in data.files or "sigma" not in data.files:
            raise ValueError(f"{path} has no 'mu'/'sigma' arrays (keys: {data.files})")
        mu = np.asarray(data["mu"], np.float64)
        sigma = np.asarray(data["sigma"], np.float64)
        meta = json.loads(str(data["meta"])) if "meta" in data.files else {}
        if "num_images" in data.files:
            meta.setdefault("num_images", int(data["num_images"]))
    return mu, sigma, meta
