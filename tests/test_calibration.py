"""Decision thresholds from held-out normals (and labelled anomalies)."""

from __future__ import annotations

import numpy as np
import pytest

from decodiff_cli import calibration
from decodiff_cli.calibration import (
    MARGIN,
    PIXEL_QUANTILE,
    f1_optimal_threshold,
    labelled_thresholds,
    make_calibration,
    normal_thresholds,
    subsample_pixels,
)


def _flagged(values, threshold) -> np.ndarray:
    """The detector's decision: anomalous when score >= threshold."""
    return np.asarray(values) >= threshold


# ---------------------------------------------------------------------- normal-quantile


@pytest.mark.parametrize("seed", range(5))
def test_image_threshold_is_above_every_normal_score_by_the_documented_margin(seed):
    rng = np.random.default_rng(seed)
    scores = rng.beta(2, 5, size=rng.integers(3, 40))
    pixels = rng.random((len(scores), 16, 16)) * 0.5
    th = normal_thresholds(scores, pixels)
    hi, med = scores.max(), np.median(scores)
    assert th["image_threshold"] == pytest.approx(hi + 0.1 * (hi - med), rel=0, abs=1e-12)
    assert th["image_threshold"] > hi
    assert not _flagged(scores, th["image_threshold"]).any()
    assert th["rule"] == "normal-quantile"
    assert th["num_normal"] == len(scores)
    assert th["normal_score_max"] == pytest.approx(hi)
    assert th["normal_score_median"] == pytest.approx(med)


def test_pixel_threshold_is_above_the_999th_percentile():
    rng = np.random.default_rng(7)
    pixels = rng.gamma(2.0, 0.05, size=(20, 64, 64)).astype(np.float32)
    th = normal_thresholds(rng.random(20), pixels)
    q, med = np.quantile(pixels.ravel(), 0.999), np.median(pixels)
    assert th["pixel_threshold"] >= q
    assert th["pixel_threshold"] == pytest.approx(q + MARGIN * (q - med), rel=1e-6)
    assert _flagged(pixels, th["pixel_threshold"]).mean() <= 1 - PIXEL_QUANTILE
    # the pixel rule uses pixels, not image scores
    assert th["pixel_threshold"] < pixels.max() + 1e-9


def test_ties_still_call_every_normal_normal():
    """Saturated maps give many image scores of exactly 1.0 (and perfect maps pixels of 0):
    the threshold must still lie strictly above them, or every normal is flagged."""
    th = normal_thresholds(np.array([1.0, 1.0, 1.0]), np.zeros((3, 8, 8), dtype=np.float32))
    assert th["image_threshold"] > 1.0
    assert th["pixel_threshold"] > 0.0
    assert not _flagged([1.0, 1.0, 1.0], th["image_threshold"]).any()
    assert not _flagged(np.zeros(10), th["pixel_threshold"]).any()
    # float32 scores (as the maps are) are not flagged either
    single = normal_thresholds(np.array([0.3], dtype=np.float32), np.full(100, 0.2, dtype=np.float32))
    assert not _flagged(np.float32(0.3), single["image_threshold"])
    assert not _flagged(np.float32(0.2), single["pixel_threshold"])
    assert single["image_threshold"] == pytest.approx(0.3, abs=1e-7)  # one float32 step above
    # and in float32 arithmetic, where a Python float threshold is compared to a float32 map
    assert not (np.zeros(5, dtype=np.float32) >= th["pixel_threshold"]).any()
    assert not (np.ones(5, dtype=np.float32) >= th["image_threshold"]).any()


def test_no_held_out_image_is_an_error():
    with pytest.raises(ValueError, match="at least one"):
        normal_thresholds(np.array([]), np.zeros(4))


# --------------------------------------------------------------------------- f1-optimal


def _brute_force_f1(scores, labels):
    best = (-1.0, None)
    for t in np.unique(scores):
        pred = scores >= t
        tp = int((pred & (labels == 1)).sum())
        fp = int((pred & (labels == 0)).sum())
        fn = int((~pred & (labels == 1)).sum())
        f1 = 2 * tp / (2 * tp + fp + fn) if tp else 0.0
        if f1 > best[0]:
            best = (f1, t)
    return best


def _f1_at(scores, labels, t):
    pred = scores >= t
    tp = int((pred & (labels == 1)).sum())
    fp = int((pred & (labels == 0)).sum())
    fn = int((~pred & (labels == 1)).sum())
    return 2 * tp / (2 * tp + fp + fn) if tp else 0.0


@pytest.mark.parametrize("seed", range(12))
def test_f1_optimal_threshold_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 40))
    labels = (rng.random(n) < 0.4).astype(int)
    labels[0], labels[1] = 0, 1  # both classes present
    scores = rng.random(n) + 0.6 * labels * rng.random()
    if seed % 3 == 0:
        scores = np.round(scores, 1)  # ties
    t, f1 = f1_optimal_threshold(scores, labels)
    best_f1, _ = _brute_force_f1(scores, labels)
    assert f1 == pytest.approx(best_f1, abs=1e-12)
    assert _f1_at(scores, labels, t) == pytest.approx(best_f1, abs=1e-12)
    assert t in set(scores.tolist())  # a real score cut


def test_f1_optimal_threshold_on_separable_data():
    scores = np.array([0.1, 0.2, 0.3, 0.7, 0.8])
    labels = np.array([0, 0, 0, 1, 1])
    assert f1_optimal_threshold(scores, labels) == (pytest.approx(0.7), pytest.approx(1.0))


# --------------------------------------------------------------------------- labelled


def test_labelled_thresholds_switch_the_rule():
    rng = np.random.default_rng(3)
    normal = rng.random(20) * 0.5
    anomalous = 0.4 + rng.random(10) * 0.6
    normal_pixels = rng.random((20, 8, 8)).astype(np.float32) * 0.3

    plain = normal_thresholds(normal, normal_pixels)
    image_only = labelled_thresholds(normal, normal_pixels, anomalous)
    assert image_only["rule"] == "f1-optimal (image)"
    assert image_only["num_anomalous"] == 10
    expected_t, expected_f1 = f1_optimal_threshold(np.concatenate([normal, anomalous]), np.r_[np.zeros(20), np.ones(10)])
    assert image_only["image_threshold"] == pytest.approx(expected_t)
    assert image_only["image_f1"] == pytest.approx(expected_f1)
    assert image_only["image_threshold"] != pytest.approx(plain["image_threshold"])
    assert image_only["pixel_threshold"] == pytest.approx(plain["pixel_threshold"])  # no masks: fallback
    assert "pixel_f1" not in image_only

    # masks without a single anomalous pixel cannot set a pixel threshold
    empty = labelled_thresholds(normal, normal_pixels, anomalous, rng.random(50), np.zeros(50, dtype=bool))
    assert empty["rule"] == "f1-optimal (image)"
    assert empty["pixel_threshold"] == pytest.approx(plain["pixel_threshold"])

    pixel_scores = np.r_[rng.random(200) * 0.4, 0.3 + rng.random(50) * 0.7]
    pixel_labels = np.r_[np.zeros(200, dtype=bool), np.ones(50, dtype=bool)]
    both = labelled_thresholds(normal, normal_pixels, anomalous, pixel_scores, pixel_labels)
    assert both["rule"] == "f1-optimal (image and pixel)"
    pt, pf1 = f1_optimal_threshold(pixel_scores, pixel_labels)
    assert both["pixel_threshold"] == pytest.approx(pt)
    assert both["pixel_f1"] == pytest.approx(pf1)
    assert both["pixel_threshold"] != pytest.approx(plain["pixel_threshold"])


# ------------------------------------------------------------------------------ helpers


def test_subsample_pixels_is_bounded_and_seeded(monkeypatch):
    maps = [np.arange(100, dtype=np.float32).reshape(10, 10), np.arange(100, 150, dtype=np.float32)]
    everything = subsample_pixels(maps)
    assert sorted(everything.tolist()) == list(range(150))
    monkeypatch.setattr(calibration, "MAX_PIXELS", 40)
    a, b = subsample_pixels(maps, seed=1), subsample_pixels(maps, seed=1)
    assert a.size == 40 and len(set(a.tolist())) == 40  # without replacement
    assert np.array_equal(a, b)
    assert not np.array_equal(a, subsample_pixels(maps, seed=2))


def test_make_calibration_layout():
    per = {"tile": {"image_threshold": 0.5}}
    cal = make_calibration(per)
    assert cal == {"version": 1, "margin": MARGIN, "pixel_quantile": PIXEL_QUANTILE, "categories": per}
    assert MARGIN == 0.1 and PIXEL_QUANTILE == 0.999
