"""Decision thresholds, per category, from held-out normal images (or labelled anomalies).

Rule without labels ("normal-quantile"), documented in the README:
- image threshold = the highest held-out normal image score, plus a margin of 10% of the
  spread between the median and that maximum (so the largest normal score seen is still
  called normal, with room for unseen normals);
- pixel threshold = the 99.9th percentile of all held-out normal pixels, plus the same
  10% margin over the median pixel: at most ~0.1% of normal pixels are flagged.
With labelled anomalies ("f1-optimal"): the thresholds that maximise F1 over the given
normal and anomalous images (image level) and over their pixels (pixel level, when
masks exist); the rule not supported by labels falls back to the normal-quantile one.
"""

from __future__ import annotations

from typing import Any

import numpy as np

MARGIN = 0.1
PIXEL_QUANTILE = 0.999
MAX_PIXELS = 2_000_000  # pixel quantiles from a fixed-size random sample: bounded memory


def _with_margin(high: float, median: float) -> float:
    # Strictly above `high`, also once compared in float32 (maps are float32): the detector
    # flags score >= threshold, so with no spread (ties, saturated maps, all-zero pixels)
    # `high` itself would otherwise be called anomalous.
    high, median = float(high), float(median)
    above = float(np.nextafter(np.float32(high), np.float32(np.inf)))
    return float(max(high + MARGIN * max(high - median, 0.0), above))


def normal_thresholds(scores: np.ndarray, pixels: np.ndarray) -> dict[str, Any]:
    """scores: (N,) held-out normal image scores; pixels: any-shape normal map values."""
    scores = np.asarray(scores, dtype=np.float64)
    pixels = np.asarray(pixels, dtype=np.float32).ravel()
    if scores.size == 0:
        raise ValueError("calibration needs at least one held-out normal image")
    return {
        "image_threshold": _with_margin(scores.max(), np.median(scores)),
        "pixel_threshold": _with_margin(np.quantile(pixels, PIXEL_QUANTILE), np.median(pixels)),
        "rule": "normal-quantile",
        "num_normal": int(scores.size),
        "normal_score_max": float(scores.max()),
        "normal_score_median": float(np.median(scores)),
    }


def f1_optimal_threshold(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """(threshold, F1): the score cut with the best F1 (predict anomalous when score >= t)."""
    from sklearn.metrics import precision_recall_curve

    precision, recall, cuts = precision_recall_curve(np.asarray(labels).ravel(), np.asarray(scores).ravel())
    f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
    best = int(np.argmax(f1[:-1]))  # the last PR point has no threshold
    return float(cuts[best]), float(f1[best])


def labelled_thresholds(
    normal_scores: np.ndarray,
    normal_pixels: np.ndarray,
    anomalous_scores: np.ndarray,
    pixel_scores: np.ndarray | None = None,
    pixel_labels: np.ndarray | None = None,
) -> dict[str, Any]:
    result = normal_thresholds(normal_scores, normal_pixels)
    scores = np.concatenate([normal_scores, anomalous_scores])
    labels = np.concatenate([np.zeros(len(normal_scores)), np.ones(len(anomalous_scores))])
    result["image_threshold"], result["image_f1"] = f1_optimal_threshold(scores, labels)
    result["rule"] = "f1-optimal (image)"
    result["num_anomalous"] = int(len(anomalous_scores))
    if pixel_scores is not None and pixel_labels is not None and pixel_labels.any():
        result["pixel_threshold"], result["pixel_f1"] = f1_optimal_threshold(pixel_scores, pixel_labels)
        result["rule"] = "f1-optimal (image and pixel)"
    return result


def subsample_pixels(maps: list[np.ndarray], seed: int = 0) -> np.ndarray:
    """All map values, or a uniform random sample of MAX_PIXELS of them."""
    values = np.concatenate([np.asarray(m, dtype=np.float32).ravel() for m in maps])
    if values.size > MAX_PIXELS:
        values = np.random.default_rng(seed).choice(values, MAX_PIXELS, replace=False)
    return values


def make_calibration(per_category: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return {"version": 1, "margin": MARGIN, "pixel_quantile": PIXEL_QUANTILE, "categories": per_category}
