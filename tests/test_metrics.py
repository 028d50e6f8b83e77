"""Metrics against a brute-force loop over every threshold, and against scikit-learn."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import average_precision_score, roc_auc_score

from decodiff_cli import metrics
from decodiff_cli.metrics import (
    compute_metrics, image_metrics, pixel_metrics, pr_curve, pro_curve, roc_curve,
)


def brute_force(scores, labels, masks=None, limit=0.3):
    """Every metric by looping over distinct thresholds; PRO region by region."""
    scores, labels = np.asarray(scores).ravel(), np.asarray(labels).ravel().astype(bool)
    n_pos, n_neg = labels.sum(), (~labels).sum()
    regions = []  # boolean flat masks, one per 8-connected region of each image
    if masks is not None:  # (N, H, W), or a list of images of different sizes
        ends = np.cumsum([m.size for m in masks])
        for i, m in enumerate(masks):
            lab, k = ndimage.label(m, structure=np.ones((3, 3)))
            for r in range(1, k + 1):
                full = np.zeros(ends[-1], bool)
                full[ends[i] - m.size:ends[i]] = (lab == r).ravel()
                regions.append(full)
    points = [(0.0, 0.0, 0.0, None)]  # (fpr, tpr, pro, precision) from threshold +inf
    f1 = 0.0
    for t in sorted(set(scores.tolist()), reverse=True):
        pred = scores >= t
        tp, fp = (pred & labels).sum(), (pred & ~labels).sum()
        pro = np.mean([(pred & r).sum() / r.sum() for r in regions]) if regions else 0.0
        points.append((fp / n_neg, tp / n_pos, pro, tp / (tp + fp)))
        f1 = max(f1, 2 * tp / (n_pos + tp + fp))
    auroc = ap = aupro = 0.0
    for (x0, y0, p0, _), (x1, y1, p1, prec) in zip(points, points[1:]):
        auroc += (x1 - x0) * (y0 + y1) / 2
        ap += (y1 - y0) * prec
        if x1 <= limit:
            aupro += (x1 - x0) * (p0 + p1) / 2
        elif x0 < limit:
            p_lim = p0 + (p1 - p0) * (limit - x0) / (x1 - x0)
            aupro += (limit - x0) * (p0 + p_lim) / 2
    return {"auroc": auroc, "ap": ap, "f1max": f1, "aupro": aupro / limit}


def random_maps(seed, n=4, size=12, levels=6):
    """Quantised scores (many ties) and rectangles, some touching only diagonally."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, size, size), bool)
    for i in range(n):
        for _ in range(rng.integers(0, 3)):
            y, x = rng.integers(0, size - 3, 2)
            h, w = rng.integers(1, 4, 2)
            masks[i, y:y + h, x:x + w] = True
    masks[0, 0, 0] = masks[0, 1, 1] = True  # a diagonal pair: one region, 8-connected
    maps = np.floor(rng.random(masks.shape) * levels + masks * rng.random() * 3)
    return maps.astype(np.float32), masks


@pytest.mark.parametrize("seed", range(6))
def test_image_metrics_match_brute_force_and_sklearn(seed):
    rng = np.random.default_rng(seed)
    labels = rng.random(40) < 0.4
    labels[:2] = [True, False]
    scores = np.round(rng.random(40) + labels * 0.3, 1)  # ties on purpose
    got = image_metrics(scores, labels).values
    want = brute_force(scores, labels)
    for key in ("auroc", "ap", "f1max"):
        assert got[f"image_{key}"] == pytest.approx(want[key], abs=1e-12)
    assert got["image_auroc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert got["image_ap"] == pytest.approx(average_precision_score(labels, scores), abs=1e-12)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("chunk", [7, 1 << 22])  # tiny chunks: runs of ties span chunks
def test_pixel_metrics_match_brute_force(seed, chunk, monkeypatch):
    monkeypatch.setattr(metrics, "_CHUNK", chunk)
    maps, masks = random_maps(seed)
    got = pixel_metrics(maps, masks).values
    want = brute_force(maps, masks, masks)
    for key in ("auroc", "ap", "f1max", "aupro"):
        assert got[f"pixel_{key}"] == pytest.approx(want[key], abs=1e-12), key
    flat_y, flat_s = masks.ravel(), maps.ravel()
    assert got["pixel_auroc"] == pytest.approx(roc_auc_score(flat_y, flat_s), abs=1e-12)
    assert got["pixel_ap"] == pytest.approx(average_precision_score(flat_y, flat_s), abs=1e-12)


@pytest.mark.parametrize("seed", range(3))
def test_images_of_different_sizes_pool_their_own_pixels(seed):
    rng = np.random.default_rng(seed)
    shapes = [(5, 7), (9, 4), (12, 12), (3, 10)]
    masks = [rng.random(shape) < 0.2 for shape in shapes]
    maps = [np.floor(rng.random(m.shape) * 8 + m * 3).astype(np.float32) for m in masks]
    got = pixel_metrics(maps, masks).values
    flat_s, flat_y = np.concatenate([m.ravel() for m in maps]), np.concatenate([m.ravel() for m in masks])
    want = brute_force(flat_s, flat_y, masks)
    for key in ("auroc", "ap", "f1max", "aupro"):
        assert got[f"pixel_{key}"] == pytest.approx(want[key], abs=1e-12), key
    # The same images given as a list or stacked: one result.
    square = [np.resize(m, (6, 6)) for m in maps], [np.resize(m, (6, 6)) for m in masks]
    assert pixel_metrics(*square).values == pixel_metrics(np.stack(square[0]), np.stack(square[1])).values
    with pytest.raises(ValueError, match="anomaly map 1 .* and its mask"):
        pixel_metrics(maps, [masks[0], masks[0], masks[2], masks[3]])


def test_continuous_scores_agree_with_sklearn():
    rng = np.random.default_rng(0)
    masks = rng.random((3, 20, 20)) < 0.1
    maps = rng.random(masks.shape).astype(np.float32) + masks * 0.4
    got = pixel_metrics(maps, masks).values
    assert got["pixel_auroc"] == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()))
    assert got["pixel_ap"] == pytest.approx(
        average_precision_score(masks.ravel(), maps.ravel()))


def test_perfect_map_scores_one():
    _, masks = random_maps(1)
    got = pixel_metrics(masks.astype(np.float32), masks).values
    assert got == pytest.approx(
        {"pixel_auroc": 1.0, "pixel_ap": 1.0, "pixel_f1max": 1.0, "pixel_aupro": 1.0})


def test_constant_map_aupro():
    # One step from (0, 0) to (1, 1): PRO(0.3) = 0.3, area 0.045, / 0.3 = 0.15.
    _, masks = random_maps(2)
    got = pixel_metrics(np.zeros(masks.shape, np.float32), masks).values
    assert got["pixel_aupro"] == pytest.approx(0.15)
    assert got["pixel_auroc"] == pytest.approx(0.5)


def test_regions_are_eight_connected():
    masks = np.zeros((1, 6, 6), bool)
    masks[0, 0, 0] = masks[0, 1, 1] = True  # one region of two pixels
    masks[0, 4, 4] = True  # a second region
    maps = np.zeros(masks.shape, np.float32)
    maps[0, 0, 0] = 1.0  # only half of the first region scores high
    curve = pro_curve(maps, masks)
    assert curve.y[1] == pytest.approx(0.25)  # 4-connectivity would give 1/3


def test_undefined_metrics_are_nan_with_reasons():
    maps = np.random.default_rng(0).random((2, 8, 8)).astype(np.float32)
    result = compute_metrics([0.1, 0.2], [0, 0], maps, np.zeros(maps.shape, bool))
    assert all(math.isnan(v) for v in result.values.values())
    assert len(result.values) == 7
    assert any("image" in n and "anomalous" in n for n in result.notes)
    assert any("pixel" in n and "AUPRO" in n for n in result.notes)
    assert result.curves == {}


def test_all_anomalous_keeps_ap_but_not_auroc():
    result = image_metrics([0.3, 0.9], [1, 1])
    assert math.isnan(result.values["image_auroc"])
    assert result.values["image_ap"] == 1.0 and result.values["image_f1max"] == 1.0
    assert "false-positive" in result.notes[0]


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="NaN"):
        image_metrics([0.1, float("nan")], [0, 1])
    with pytest.raises(ValueError, match="shape"):
        pixel_metrics(np.zeros((1, 4, 4)), np.zeros((1, 4, 5), bool))
    with pytest.raises(ValueError, match="label"):
        image_metrics([0.1, 0.2], [1])
    with pytest.raises(ValueError, match="both"):
        roc_curve([0.1, 0.2], [0, 0])


def test_curves_span_the_unit_square_and_are_thinned():
    rng = np.random.default_rng(3)
    labels = rng.random(5000) < 0.3
    scores = rng.random(5000) + labels
    roc = roc_curve(scores, labels, curve_points=50)
    assert (roc.x[0], roc.y[0], roc.x[-1], roc.y[-1]) == (0, 0, 1, 1)
    assert np.all(np.diff(roc.x) >= 0) and roc.x.size < 200
    pr = pr_curve(scores, labels, curve_points=50)
    assert pr.x[-1] == 1 and pr.y[-1] == pytest.approx(0.3, abs=0.05)
    maps, masks = random_maps(4)
    pro = pro_curve(maps, masks)
    assert pro.y[-1] == pytest.approx(1.0) and np.all(np.diff(pro.y) >= -1e-12)
