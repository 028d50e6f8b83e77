"""Benchmark on a tiny synthetic MVTec AD layout: discovery, both map sources, reports."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from PIL import Image

from decodiff_cli.benchmark import (
    discover, evaluate, load_mask, to_protocol,
)
from decodiff_cli.metrics import METRIC_KEYS

SIDE = 64


def write_category(root, name="widget", good=3, bad=3, mask_side=SIDE):
    """good/ and scratch/ images of SIDE x SIDE, each scratch a square with its mask."""
    rng = np.random.default_rng(len(name))
    for defect, count in (("good", good), ("scratch", bad)):
        (root / name / "test" / defect).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            img = rng.integers(0, 255, (SIDE, SIDE, 3), dtype=np.uint8)
            Image.fromarray(img).save(root / name / "test" / defect / f"{i:03d}.png")
            if defect == "good":
                continue
            mask = np.zeros((mask_side, mask_side), np.uint8)
            mask[18 + 3 * i:30 + 3 * i, 20:34] = 255
            gt = root / name / "ground_truth" / defect
            gt.mkdir(parents=True, exist_ok=True)
            Image.fromarray(mask).save(gt / f"{i:03d}_mask.png")
    return root / name


def true_mask(path):
    """Protocol-space ground truth of an image path (zeros for good images)."""
    gt = path.parents[2] / "ground_truth" / path.parent.name / f"{path.stem}_mask.png"
    if not gt.exists():
        return np.zeros((256, 256), np.float32)
    return (to_protocol(load_mask(gt).astype(np.float32), "paper") > 0.5).astype(np.float32)


def noisy_predict(paths, category):
    for p in paths:
        rng = np.random.default_rng(sum(map(ord, p.parent.name + p.stem)))
        yield true_mask(p) * 0.3 + rng.random((256, 256), dtype=np.float32)


def perfect_predict(paths, category):
    for p in paths:
        yield true_mask(p)


@pytest.fixture
def dataset(tmp_path):
    write_category(tmp_path / "mvtec", "widget")
    write_category(tmp_path / "mvtec", "gadget", good=2, bad=2)
    return tmp_path / "mvtec"


def test_discovery_layouts(dataset):
    cats = discover(dataset)
    assert [c.name for c in cats] == ["gadget", "widget"]
    widget = cats[1]
    assert [s.label for s in widget.samples] == [0, 0, 0, 1, 1, 1]
    assert widget.samples[3].mask.name == "000_mask.png"
    single = discover(dataset / "widget")  # a category folder on its own
    assert [c.name for c in single] == ["widget"] and len(single[0].samples) == 6
    assert [c.name for c in discover(dataset, ["widget"])] == ["widget"]


def test_visa_split_csv(tmp_path):
    root = tmp_path / "visa"
    (root / "candle" / "Data" / "Images").mkdir(parents=True)
    (root / "split_csv").mkdir()
    rows = ["object,split,label,image,mask"]
    for i, label in enumerate(["normal", "anomaly", "normal"]):
        img = f"candle/Data/Images/{i}.JPG"
        Image.new("RGB", (40, 30)).save(root / img, format="JPEG")
        mask = ""
        if label == "anomaly":
            mask = f"candle/Data/Masks/{i}.png"
            (root / mask).parent.mkdir(parents=True, exist_ok=True)
            Image.new("L", (40, 30), 255).save(root / mask)
        rows.append(f"candle,{'train' if i == 2 else 'test'},{label},{img},{mask}")
    (root / "split_csv" / "1cls.csv").write_text("\n".join(rows) + "\n")
    (cat,) = discover(root)
    assert cat.name == "candle" and [s.label for s in cat.samples] == [0, 1]
    assert [s.defect for s in cat.samples] == ["good", "bad"]


def test_stored_maps_and_callable_agree(dataset, tmp_path):
    direct = evaluate(dataset, predict=noisy_predict)
    for ext in ("tiff", "npy"):
        maps_dir = tmp_path / f"maps_{ext}"
        for cat in discover(dataset):
            for s, a in zip(cat.samples, noisy_predict([s.image for s in cat.samples], cat.name)):
                out = maps_dir / cat.name / "test" / s.defect / f"{s.image.stem}.{ext}"
                out.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(a).save(out) if ext == "tiff" else np.save(out, a)
        stored = evaluate(dataset, maps_dir=maps_dir)
        assert stored.categories == direct.categories
    assert set(direct.categories["widget"]) == set(METRIC_KEYS)
    assert 0.5 < direct.mean["pixel_auroc"] < 1.0


def test_a_predictor_may_give_its_own_image_scores(dataset):
    def with_scores(paths, category):
        for amap, path in zip(perfect_predict(paths, category), paths):
            yield amap, float(path.parent.name == "good")  # the worst possible score: normal high
    result = evaluate(dataset, predict=with_scores)
    maps_only = evaluate(dataset, predict=perfect_predict)
    for name, values in result.categories.items():
        assert values["image_auroc"] == pytest.approx(0.0)
        assert values["pixel_auroc"] == maps_only.categories[name]["pixel_auroc"] == pytest.approx(1.0)


def test_perfect_predictor_scores_one(dataset):
    result = evaluate(dataset, predict=perfect_predict)
    for values in result.categories.values():
        assert values == pytest.approx({k: 1.0 for k in METRIC_KEYS})


def test_full_resolution_maps_get_the_image_transform(dataset, tmp_path):
    # Perfect maps stored at the image's own 64x64 resolution: resized like the masks.
    for cat in discover(dataset):
        for s in cat.samples:
            a = load_mask(s.mask).astype(np.float32) if s.mask else np.zeros((SIDE, SIDE))
            out = tmp_path / "maps" / cat.name / "test" / s.defect / f"{s.image.stem}.tiff"
            out.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(a.astype(np.float32)).save(out)
    result = evaluate(dataset, maps_dir=tmp_path / "maps", protocol="paper")
    assert result.mean == pytest.approx({k: 1.0 for k in METRIC_KEYS})


def test_no_anomalies_is_undefined_not_a_crash(tmp_path):
    write_category(tmp_path, "plain", good=3, bad=0)
    result = evaluate(tmp_path, predict=noisy_predict)
    assert all(math.isnan(v) for v in result.categories["plain"].values())
    assert any(n.startswith("plain:") and "undefined" in n for n in result.notes)
    assert json.loads(result.to_json())["categories"]["plain"]["image_auroc"] is None


def test_dataset_errors(tmp_path):
    (tmp_path / "empty" / "test" / "good").mkdir(parents=True)
    with pytest.raises(ValueError, match="no test images"):
        discover(tmp_path / "empty")
    write_category(tmp_path / "bad", "widget")
    with pytest.raises(ValueError, match="not found.*available: widget"):
        discover(tmp_path / "bad", ["nut"])
    (tmp_path / "bad" / "widget" / "ground_truth" / "scratch" / "001_mask.png").unlink()
    with pytest.raises(ValueError, match="mask missing.*001.png"):
        discover(tmp_path / "bad")
    write_category(tmp_path / "sized", "widget", mask_side=32)
    with pytest.raises(ValueError, match=r"000_mask.png is 32x32 but its image .*64x64"):
        evaluate(tmp_path / "sized", predict=perfect_predict)
    with pytest.raises(ValueError, match="exactly one"):
        evaluate(tmp_path / "sized")
    write_category(tmp_path / "ok", "widget")
    with pytest.raises(ValueError, match="no anomaly map for .*000.png"):
        evaluate(tmp_path / "ok", maps_dir=tmp_path / "nowhere")
    with pytest.raises(ValueError, match="unknown protocol"):
        evaluate(tmp_path / "ok", maps_dir=tmp_path / "nowhere", protocol="half")


def test_predict_errors(dataset):
    with pytest.raises(ValueError, match="gave 2 anomaly maps"):
        evaluate(dataset, predict=lambda paths, c: [np.zeros((256, 256))] * 2)
    with pytest.raises(ValueError, match="needs 256x256"):
        evaluate(dataset, predict=lambda paths, c: [np.zeros((64, 64))] * len(paths))
    with pytest.raises(ValueError, match="more than 4"):
        evaluate(dataset, predict=lambda paths, c: [np.zeros((256, 256))] * 9)


@pytest.mark.parametrize("mode,dtype,high", [
    ("L", np.uint8, 255), ("L", np.uint8, 1), ("I;16", np.uint16, 65535), ("1", bool, 1),
])
def test_mask_kinds(tmp_path, mode, dtype, high):
    a = np.zeros((8, 8), dtype)
    a[2:4, 2:4] = high
    a[5, 5] = 0 if high == 1 else high // 3  # faint: below half the range
    path = tmp_path / "m.png"
    Image.fromarray(a).save(path)
    got = load_mask(path)
    assert got.sum() == 4 and got[2, 2] and not got[5, 5]


def test_a_16_bit_mask_coded_0_255_reads_the_same_for_benchmark_and_fit(tmp_path):
    """One rule for every mask: a 16-bit file holding 8-bit values is read as 0/255 (the
    benchmark's own reader once took it as empty, while fit's read it as marked)."""
    from decodiff_cli.config import PreprocessConfig
    from decodiff_cli.images import mask_to_model_space

    a = np.zeros((16, 16), np.uint16)
    a[4:8, 4:8] = 255
    Image.fromarray(a).save(tmp_path / "m.png")
    assert load_mask(tmp_path / "m.png").sum() == 16
    assert mask_to_model_space(tmp_path / "m.png", PreprocessConfig(image_size=16, resize=16)).sum() == 16


def test_palette_mask_uses_colour_not_index(tmp_path):
    im = Image.new("P", (4, 4), 0)
    im.putpalette([0, 0, 0, 255, 255, 255] + [0] * 762)
    im.putpixel((1, 1), 1)
    im.save(tmp_path / "p.png")
    assert load_mask(tmp_path / "p.png").sum() == 1


def test_reports(dataset, tmp_path):
    calls = []
    result = evaluate(dataset, predict=noisy_predict, progress=lambda *a: calls.append(a))
    assert calls[-1] == ("widget", 6, 6) and len(calls) == 10
    result.speed["seconds_per_image"] = 0.5
    data = json.loads(result.to_json())
    assert set(data) >= {"categories", "mean", "speed"}
    assert data["speed"] == {"seconds_per_image": 0.5}
    assert data["mean"]["pixel_aupro"] == pytest.approx(result.mean["pixel_aupro"])
    md = result.to_markdown()
    assert md.count("\n") == 5 and "| mean |" in md and "AUPRO" in md
    from rich.console import Console

    console = Console(record=True, width=120)
    console.print(result.rich_table())
    assert "widget" in console.export_text()
    paths = result.write_plots(tmp_path / "plots")
    assert [p.name for p in paths] == ["gadget_curves.png", "widget_curves.png"]
    with Image.open(paths[0]) as im:
        assert im.mode == "RGB" and im.width > 3 * im.height / 2
        # some pixels carry each curve's colour (blue image, red pixel)
        colours = {c for _, c in im.getcolors(1 << 20)}
    assert (31, 119, 180) in colours and (214, 39, 40) in colours


def test_per_defect_metrics_show_which_type_is_missed(dataset):
    widget = dataset / "widget"
    for sub in ("test", "ground_truth"):  # a second defect type: the scratches renamed
        for path in sorted((widget / sub / "scratch").iterdir())[:1]:
            (widget / sub / "dent").mkdir(exist_ok=True)
            path.rename(widget / sub / "dent" / path.name)

    def misses_dents(paths, category):
        for amap, path in zip(perfect_predict(paths, category), paths):
            yield (amap * 0 if path.parent.name == "dent" else amap)

    result = evaluate(dataset, predict=misses_dents, categories=["widget"], per_defect=True)
    kinds = result.defects["widget"]
    assert set(kinds) == {"dent", "scratch"}
    assert kinds["scratch"] == pytest.approx({k: 1.0 for k in METRIC_KEYS})
    assert kinds["dent"]["pixel_aupro"] < 0.5  # a flat map: only the ties at zero overlap
    assert kinds["dent"]["image_auroc"] < 1.0 and result.categories["widget"]["pixel_aupro"] < 1.0
    assert [name for name, _ in result.rows()] == ["widget", "widget/dent", "widget/scratch", "mean"]
    assert set(json.loads(result.to_json())["defects"]["widget"]) == {"dent", "scratch"}
    assert "defects" not in json.loads(evaluate(dataset, predict=perfect_predict).to_json())


# ------------------------------------------------------------------ --protocol native

NATIVE_SIZES = [(80, 80), (96, 128)]  # (H, W): non-square, not 256


def write_native_category(root, rng, name="part"):
    """Images of both sizes; blobby masks; random maps at each mask's resolution, kept
    in memory (the reference) and stored as float TIFFs (what benchmark reads)."""
    truth = []  # (map, mask, label, defect) per test image
    for defect, count in (("good", 5), ("crack", 4), ("hole", 3)):
        for i in range(count):
            h, w = NATIVE_SIZES[(i + len(defect)) % 2]
            stem = f"{i:03d}"
            image = root / name / "test" / defect / f"{stem}.png"
            image.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(image)
            mask = np.zeros((h, w), bool)
            if defect != "good":
                yy, xx = np.mgrid[:h, :w]
                for _ in range(rng.integers(1, 4)):  # ellipses and a rectangle: regions of many sizes
                    cy, cx, ry, rx = rng.integers(4, h - 4), rng.integers(4, w - 4), *rng.integers(2, 14, 2)
                    mask |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
                y, x = rng.integers(0, h - 6), rng.integers(0, w - 6)
                mask[y:y + rng.integers(1, 6), x:x + rng.integers(1, 6)] = True
                gt = root / name / "ground_truth" / defect / f"{stem}_mask.png"
                gt.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(mask.astype(np.uint8) * 255).save(gt)
            # Quantised (ties on purpose), a little higher on the defects, each image offset
            # at random (so that its maximum, the image score, does not separate the labels).
            amap = (np.floor((rng.random((h, w)) + 0.35 * mask + 1.5 * rng.random()) * 40) / 40).astype(np.float32)
            stored = root.parent / "maps" / name / "test" / defect / f"{stem}.tiff"
            stored.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(amap).save(stored)
            truth.append((amap, mask, int(defect != "good"), defect))
    return truth


def reference_metrics(truth, limit=0.3):
    """The seven metrics by independent code: scikit-learn over the pooled pixels, and
    AUPRO threshold by threshold with 8-connected regions labelled in each image."""
    from scipy import ndimage
    from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

    def f1max(y, s):
        p, r, _ = precision_recall_curve(y, s)
        return float(np.max(2 * p * r / np.maximum(p + r, 1e-300)))

    maps, masks, labels, _ = zip(*truth)
    scores = [float(m.max()) for m in maps]
    s = np.concatenate([m.ravel() for m in maps])
    y = np.concatenate([k.ravel() for k in masks])
    region_ids, count = [], 0
    for k in masks:
        lab, n = ndimage.label(k, structure=np.ones((3, 3), int))
        region_ids.append(np.where(lab > 0, lab + count, 0).ravel())
        count += n
    region_ids = np.concatenate(region_ids)
    sizes = np.bincount(region_ids, minlength=count + 1)[1:]
    xs, pros = [0.0], [0.0]
    for t in np.unique(s)[::-1]:
        above = s >= t
        xs.append(np.count_nonzero(above & ~y) / np.count_nonzero(~y))
        pros.append(float(np.mean(np.bincount(region_ids[above], minlength=count + 1)[1:] / sizes)))
    xs, pros = np.array(xs), np.array(pros)
    inside = xs <= limit
    x_cut = np.append(xs[inside], limit)
    pro_cut = np.append(pros[inside], np.interp(limit, xs, pros))
    return {
        "image_auroc": roc_auc_score(labels, scores), "image_ap": average_precision_score(labels, scores),
        "image_f1max": f1max(labels, scores),
        "pixel_auroc": roc_auc_score(y, s), "pixel_ap": average_precision_score(y, s), "pixel_f1max": f1max(y, s),
        "pixel_aupro": float(np.sum(np.diff(x_cut) * (pro_cut[1:] + pro_cut[:-1]) / 2) / limit),
    }


@pytest.mark.parametrize("seed", [0, 1])
def test_native_protocol_equals_an_independent_reference(tmp_path, seed):
    truth = write_native_category(tmp_path / "mvtec", np.random.default_rng(seed))
    want = reference_metrics(truth)
    got = evaluate(tmp_path / "mvtec", maps_dir=tmp_path / "maps", protocol="native")
    assert got.protocol == "native" and not any("resized" in note for note in got.notes)
    assert got.categories["part"] == pytest.approx(want, abs=1e-3)
    # What the issue saw: resampled to 256 px first, the same maps give other pixel numbers.
    full = evaluate(tmp_path / "mvtec", maps_dir=tmp_path / "maps", protocol="full").categories["part"]
    assert max(abs(full[k] - want[k]) for k in want if k.startswith("pixel")) > 0.01


def test_native_protocol_resizes_a_map_of_another_size_and_says_so(tmp_path):
    truth = write_native_category(tmp_path / "mvtec", np.random.default_rng(2))
    small = tmp_path / "maps" / "part" / "test" / "crack" / "000.tiff"
    index = next(i for i, t in enumerate(truth) if t[3] == "crack")
    amap, mask, label, defect = truth[index]
    assert amap.shape == (96, 128)
    half = amap[::2, ::2]
    Image.fromarray(half).save(small)
    truth[index] = (np.asarray(Image.fromarray(half).resize((128, 96), Image.Resampling.BILINEAR)), mask, label, defect)
    got = evaluate(tmp_path / "mvtec", maps_dir=tmp_path / "maps", protocol="native", per_defect=True)
    assert "part: 1 of 12 anomaly maps were not at their ground truth's resolution and were resized to it " \
           "(bilinear)" in got.notes, got.notes
    assert got.categories["part"] == pytest.approx(reference_metrics(truth), abs=1e-3)
    cracks = [t for t in truth if t[3] in ("good", "crack")]
    assert got.defects["part"]["crack"] == pytest.approx(reference_metrics(cracks), abs=1e-3)
