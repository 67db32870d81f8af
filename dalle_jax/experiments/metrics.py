"""Metrics the trainers do not log: a Fréchet distance between image sets in an embedding space, and blur.

The paper reports FID (Inception-v3 features of 256px images). Our images are 32px shapes and there is no Inception
here, so the distance is taken in the in-project CLIP's image-embedding space; it is called the "CLIP Fréchet
distance" everywhere so that nobody mistakes it for FID.
"""

from __future__ import annotations

import numpy as np


def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased) covariance of (N, D) features, in float64."""
    x = np.asarray(features, np.float64)
    if x.ndim != 2 or len(x) < 2:
        raise ValueError(f"need (N >= 2, D) features, got shape {x.shape}")
    return x.mean(axis=0), np.cov(x, rowvar=False)


def frechet_distance_from_stats(mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray, cov2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + tr(C1 + C2 - 2 (C1 C2)^(1/2)) between two Gaussians.

    tr((C1 C2)^(1/2)) is the sum of the square roots of the eigenvalues of C1^(1/2) C2 C1^(1/2), a symmetric PSD
    matrix, so no general (complex, unstable) matrix square root is needed.
    """
    w, v = np.linalg.eigh(cov1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    middle = root1 @ cov2 @ root1
    trace_root = np.sum(np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0, None)))
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(cov1) + np.trace(cov2) - 2 * trace_root)


def frechet_distance(features1: np.ndarray, features2: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two (N, D) feature sets."""
    return frechet_distance_from_stats(*gaussian_stats(features1), *gaussian_stats(features2))


def blur(images: np.ndarray, radius: float) -> np.ndarray:
    """(N, H, W, 3) uint8 images, each Gaussian-blurred with PIL's `radius` (0: unchanged)."""
    if radius == 0:
        return images
    from PIL import Image, ImageFilter

    return np.stack([np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(radius))) for image in images])
