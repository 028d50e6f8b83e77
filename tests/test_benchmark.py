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
