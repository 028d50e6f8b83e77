"""The `decodiff` command end to end, on the tiny synthetic dataset and bundle (conftest)."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from decodiff_cli import Detector, __version__
from decodiff_cli.records import RECORD_FIELDS

from conftest import CATEGORY, as_format_1

COMMANDS = ("fit", "calibrate", "info", "score", "localize", "export-masks", "benchmark")
METRICS = ("image_auroc", "image_ap", "image_f1max", "pixel_auroc", "pixel_ap", "pixel_f1max", "pixel_aupro")
TINY_FIT = ("--autoencoder", "pixel", "--model-size", "tiny", "--image-size", "64", "--batch-size", "4")


def jsonl(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def copy_images(paths, folder: Path) -> list[Path]:
    """Copies named <defect>_<name>, so test/good/000.png and test/hole/000.png differ."""
    folder.mkdir(parents=True, exist_ok=True)
    return [Path(shutil.copy(p, folder / f"{p.parent.name}_{p.name}")) for p in paths]


# ------------------------------------------------------------------------------ help


def test_help_lists_every_command(invoke):
    result = invoke("--help")
    assert result.exit_code == 0
    for name in ("fit", "score", "localize", "benchmark", "export-masks", "calibrate", "info"):
        assert name in result.stdout
    assert "Exit codes" in result.stdout


def test_version(invoke):
    result = invoke("--version")
    assert result.exit_code == 0
    assert result.stdout.strip() == f"decodiff {__version__}"


@pytest.mark.parametrize("command", COMMANDS)
def test_subcommand_help(invoke, command):
    result = invoke(command, "--help")
    assert result.exit_code == 0, result.output
    assert "Usage" in result.stdout and command in result.stdout


def test_no_arguments_shows_help(invoke):
    result = invoke()
    assert "Usage" in result.output and result.exit_code == 2  # no command is a usage error


# ------------------------------------------------------------------------------- fit


def test_fit_writes_bundle_then_refuses_to_overwrite(invoke, category_dir, tmp_path):
    out = tmp_path / "model"
    result = invoke("fit", category_dir, "--out", out, *TINY_FIT, "--max-steps", "10")
    assert result.exit_code == 0, result.output
    for name in ("config.json", "calibration.json", "denoiser.safetensors", "checksums.json", "training_log.jsonl"):
        assert (out / name).is_file(), name
    assert not (tmp_path / "model.work").exists()  # the work folder is cleaned up
    config = json.loads((out / "config.json").read_text())
    assert config["train"]["max_steps"] == 10 and config["denoiser"]["size"] == "tiny"
    assert config["categories"] == [CATEGORY] and config["preprocess"]["image_size"] == 64
    assert "image threshold" in result.stderr

    before = digests(out)
    again = invoke("fit", category_dir, "--out", out, *TINY_FIT, "--max-steps", "10")
    assert again.exit_code == 2
    message = again.stderr.strip()
    assert len(message.splitlines()) == 1
    assert str(out) in message and "already exists" in message and "--overwrite" in message
    assert "Traceback" not in again.output
    assert digests(out) == before  # untouched

    info = invoke("info", out)
    assert info.exit_code == 0, info.output
    for text in (CATEGORY, "pixel", "tiny", "normal-quantile", "denoiser.safetensors"):
        assert text in info.stdout


def test_fit_with_anomalous_uses_f1_optimal_rule(invoke, category_dir, tmp_path):
    out = tmp_path / "model"
    result = invoke("fit", category_dir, "--out", out, *TINY_FIT, "--max-steps", "2",
                    "--anomalous", category_dir / "test" / "hole", "--anomalous", category_dir / "test" / "scratch")
    assert result.exit_code == 0, result.output
    entry = json.loads((out / "calibration.json").read_text())["categories"][CATEGORY]
    assert entry["rule"].startswith("f1-optimal")
    assert entry["rule"] == "f1-optimal (image and pixel)"  # MVTec masks were found
    assert entry["num_anomalous"] == 2
    assert "f1-optimal" in result.stderr


def test_info_on_session_bundle(invoke, bundle):
    result = invoke("info", bundle)
    assert result.exit_code == 0, result.output
    assert "thresholds [tile]" in result.stdout
    # the training recipe, and the options that replay it (the fixture: 20 steps, seed 0)
    text = " ".join(result.stdout.split())
    assert "20 steps, batch 4" in text and "per step, warm-up 5 steps" in text
    assert "--max-steps 20 --views 4 --seed 0" in text


def test_info_shows_the_paper_recipe():
    from decodiff_cli.cli.fit import _describe_map, describe_training
    from decodiff_cli.presets import build_config

    cfg = build_config("paper", {})
    training, map_text = describe_training(cfg.train), _describe_map(cfg.anomaly_map)
    for part in ("800 epochs", "batch 128", "lr 0.0001 wd 0.0001", "per epoch, warm-up 10 epochs", "cosine to 0x at 1.5x",
                 "no EMA", "precision no", "patches [1, 2, 4, 8] p 0.40 0.30 0.20 0.10", "U(0, 0.7) exact count",
                 "shuffled U(0, 0.3)", "posterior samples"):
        assert part in training, part
    for part in ("geometric", "pixel clip 0.4 on the decoder's [-1, 1] scale (blur 3)", "latent clip 0.2 (blur 1)",
                 "image score: maximum"):
        assert part in map_text, part


def test_config_file_run_options_are_not_ignored(invoke, synth_root, category_dir, tmp_path):
    """class_conditional (and overwrite, strict, resume) from a config file used to be dropped."""
    data = tmp_path / "two"
    for name in ("a", "b"):  # two classes: class-conditional by default
        shutil.copytree(category_dir / "train" / "good", data / name)
    config = tmp_path / "fit.toml"
    config.write_text("class_conditional = false\noverwrite = true\n")
    out = tmp_path / "model"
    out.mkdir()  # exists: only the file's overwrite lets the fit replace it
    result = invoke("fit", data, "--out", out, "--config", config, *TINY_FIT, "--max-steps", "2")
    assert result.exit_code == 0, result.output
    assert json.loads((out / "config.json").read_text())["denoiser"]["num_classes"] == 0


# ----------------------------------------------------------------------------- score


def test_bundle_reloads_with_identical_scores(invoke, bundle, test_images):
    first = invoke("score", bundle, *test_images, "--format", "jsonl")
    second = invoke("score", bundle, *test_images, "--format", "jsonl")
    assert first.exit_code == second.exit_code == 0, first.output
    a, b = jsonl(first.stdout), jsonl(second.stdout)
    assert len(a) == len(test_images)
    assert [(r["path"], r["score"]) for r in a] == [(r["path"], r["score"]) for r in b]


NEW_KEYS = {"anomaly_map": ["pixel_scale"],
            "train": ["lr_per_epoch", "warmup_epochs", "cosine_horizon", "lr_floor", "stop_step", "steps_done",
                      "exact_mask", "posterior_samples"]}


def test_a_bundle_written_before_the_paper_fields_scores_identically(invoke, bundle, bundle_copy, test_images):
    """Bundles without pixel_scale (and the new training fields) load with the map they
    were scored with: the pixel term in [0, 1] units of the clamped decoder output."""
    from decodiff_cli import bundle as bundle_mod

    config = json.loads((bundle_copy / "config.json").read_text())
    for section, keys in NEW_KEYS.items():
        for key in keys:
            del config[section][key]
    (bundle_copy / "config.json").write_text(json.dumps(config))
    bundle_mod._write_checksums(bundle_copy)
    old, new = (invoke("score", b, *test_images, "--format", "jsonl") for b in (bundle_copy, bundle))
    assert old.exit_code == new.exit_code == 0, old.output
    assert [r["score"] for r in jsonl(old.stdout)] == [r["score"] for r in jsonl(new.stdout)]
    config["anomaly_map"]["pixel_scale"] = "decoder"  # the paper's scale does score differently
    (bundle_copy / "config.json").write_text(json.dumps(config))
    bundle_mod._write_checksums(bundle_copy)
    paper = invoke("score", bundle_copy, *test_images, "--format", "jsonl")
    assert [r["score"] for r in jsonl(paper.stdout)] != [r["score"] for r in jsonl(new.stdout)]


def test_a_format_1_bundle_scores_identically(invoke, bundle, bundle_copy, test_images):
    from decodiff_cli import bundle as bundle_mod

    config = json.loads((bundle_copy / "config.json").read_text())
    (bundle_copy / "config.json").write_text(json.dumps(as_format_1(config)))
    bundle_mod._write_checksums(bundle_copy)
    old, new = (invoke("score", b, *test_images, "--format", "jsonl") for b in (bundle_copy, bundle))
    assert old.exit_code == new.exit_code == 0, old.output
    assert [r["score"] for r in jsonl(old.stdout)] == [r["score"] for r in jsonl(new.stdout)]


def test_score_jsonl_records(invoke, bundle, category_dir, test_images):
    result = invoke("score", bundle, category_dir / "test", "--format", "jsonl")
    assert result.exit_code == 0, result.output
    records = jsonl(result.stdout)
    assert sorted(r["path"] for r in records) == sorted(map(str, test_images))
    threshold = json.loads((bundle / "calibration.json").read_text())["categories"][CATEGORY]["image_threshold"]
    for r in records:
        assert tuple(r) == RECORD_FIELDS
        assert r["class"] == CATEGORY and r["error"] is None
        assert math.isfinite(r["score"]) and r["threshold"] == pytest.approx(threshold)
        assert r["normalized_score"] == pytest.approx(r["score"] / r["threshold"])
        assert r["is_anomalous"] == (r["score"] >= r["threshold"])


def test_score_csv_records(invoke, bundle, test_images):
    result = invoke("score", bundle, *test_images, "--format", "csv")
    assert result.exit_code == 0, result.output
    rows = list(csv.reader(io.StringIO(result.stdout)))
    assert tuple(rows[0]) == RECORD_FIELDS
    assert len(rows) == 1 + len(test_images)
    for row, path in zip(rows[1:], test_images):
        record = dict(zip(RECORD_FIELDS, row))
        assert record["path"] == str(path) and record["class"] == CATEGORY and record["error"] == ""
        assert math.isfinite(float(record["score"])) and record["is_anomalous"] in ("true", "false")


def test_score_table_is_the_default_on_a_terminal_only(invoke, bundle, good_images):
    result = invoke("score", bundle, good_images[0])  # CliRunner's stdout is no terminal
    assert result.exit_code == 0
    assert jsonl(result.stdout)[0]["path"] == str(good_images[0])
    table = invoke("score", bundle, good_images[0], "--format", "table")
    assert table.exit_code == 0 and "normal" in table.stdout


def test_score_paths_from_stdin(invoke, bundle, test_images):
    lines = "\n".join(map(str, test_images[:3])) + "\n\n"
    result = invoke("score", bundle, "-", "--format", "jsonl", input=lines)
    assert result.exit_code == 0, result.output
    assert [r["path"] for r in jsonl(result.stdout)] == [str(p) for p in test_images[:3]]


def test_fail_on_anomaly(invoke, bundle, good_images):
    forced = invoke("score", bundle, *good_images, "--format", "jsonl", "--threshold", "0", "--fail-on-anomaly")
    assert forced.exit_code == 1, forced.output
    assert all(r["is_anomalous"] for r in jsonl(forced.stdout))
    relaxed = invoke("score", bundle, *good_images, "--format", "jsonl", "--threshold", "1e9", "--fail-on-anomaly")
    assert relaxed.exit_code == 0, relaxed.output
    assert not any(r["is_anomalous"] for r in jsonl(relaxed.stdout))
    without = invoke("score", bundle, *good_images, "--format", "jsonl", "--threshold", "0")
    assert without.exit_code == 0  # anomalies alone do not fail without the flag


def test_corrupt_file_among_good_ones(invoke, bundle, good_images, tmp_path):
    folder = tmp_path / "batch"
    good = copy_images(good_images, folder)
    bad = folder / "broken.png"
    bad.write_bytes(good[0].read_bytes()[:200])
    result = invoke("score", bundle, folder, "--format", "jsonl", "--threshold", "0", "--fail-on-anomaly")
    assert result.exit_code == 3, result.output  # 3 wins over 1
    records = {Path(r["path"]).name: r for r in jsonl(result.stdout)}
    assert set(records) == {"broken.png", *(p.name for p in good)}
    assert "broken.png" in records["broken.png"]["error"] and records["broken.png"]["score"] is None
    assert all(records[p.name]["error"] is None and records[p.name]["score"] is not None for p in good)
    warnings = [line for line in result.stderr.splitlines() if "broken.png" in line]
    assert len(warnings) == 1 and "truncated or corrupt" in warnings[0]


def test_skip_existing_appends_only_new_images(invoke, bundle, test_images, tmp_path):
    folder = tmp_path / "incoming"
    copy_images(test_images[:2], folder)
    log = tmp_path / "scores.jsonl"
    first = invoke("score", bundle, folder, "--output", log, "--skip-existing")
    assert first.exit_code == 0, first.output
    assert first.stdout == ""  # records go to the file
    assert len(jsonl(log.read_text())) == 2
    content = log.read_bytes()

    again = invoke("score", bundle, folder, "--output", log, "--skip-existing")
    assert again.exit_code == 0, again.output
    assert "skipping 2 already scored" in again.stderr
    assert log.read_bytes() == content  # nothing new was scored

    new = copy_images(test_images[2:3], folder)[0]
    third = invoke("score", bundle, folder, "--output", log, "--skip-existing")
    assert third.exit_code == 0, third.output
    assert log.read_bytes().startswith(content)
    records = jsonl(log.read_text())
    assert len(records) == 3 and records[-1]["path"] == str(new)


def test_skip_existing_needs_output(invoke, bundle, good_images):
    result = invoke("score", bundle, good_images[0], "--skip-existing")
    assert result.exit_code == 2 and "--output" in result.stderr


def test_output_csv_file(invoke, bundle, good_images, tmp_path):
    log = tmp_path / "scores.csv"
    for _ in range(2):
        result = invoke("score", bundle, *good_images, "--output", log, "--format", "csv")
        assert result.exit_code == 0, result.output
    rows = list(csv.reader(log.open()))
    assert tuple(rows[0]) == RECORD_FIELDS and len(rows) == 1 + 2 * len(good_images)  # one header


# -------------------------------------------------------------------------- localize


@pytest.fixture
def non_square(good_images, tmp_path) -> Path:
    path = tmp_path / "inputs" / "wide part.png"
    path.parent.mkdir()
    Image.open(good_images[0]).convert("RGB").resize((80, 50)).save(path)
    return path


def test_localize_writes_maps_at_original_size(invoke, bundle, non_square, tmp_path):
    out = tmp_path / "review"
    result = invoke("localize", bundle, non_square.parent, "--out", out)
    assert result.exit_code == 0, result.output
    stem = out / non_square.stem
    for suffix in ("_heatmap.png", "_overlay.png", "_recon.png", "_input.png"):
        with Image.open(f"{stem}{suffix}") as im:
            assert im.size == (80, 50) and im.mode == "RGB", suffix
    with Image.open(f"{stem}_input.png") as im, Image.open(non_square) as original:
        assert np.array_equal(np.asarray(im), np.asarray(original.convert("RGB")))  # the input, unchanged
    with Image.open(f"{stem}.tiff") as im:
        assert im.mode == "F" and im.size == (80, 50)
        amap = np.asarray(im)
    assert amap.dtype == np.float32 and np.isfinite(amap).all() and amap.min() >= 0
    html = (out / "index.html").read_text()
    assert "wide part.png" in html and "wide%20part_heatmap.png" in html
    columns = re.findall(r"<th>([^<]*)</th>", html)
    assert columns.index("corrected") == columns.index("input") + 1  # the repair, beside what it repaired

    refused = invoke("localize", bundle, non_square, "--out", out)
    assert refused.exit_code == 2
    assert "is not empty" in refused.stderr and "--overwrite" in refused.stderr
    allowed = invoke("localize", bundle, non_square, "--out", out, "--overwrite")
    assert allowed.exit_code == 0, allowed.output


def test_export_masks(invoke, bundle, non_square, good_images, tmp_path):
    out = tmp_path / "masks"
    result = invoke("export-masks", bundle, non_square, good_images[0], "--out", out)
    assert result.exit_code == 0, result.output
    mvtec = out / CATEGORY / "test" / "good" / f"{good_images[0].stem}_mask.png"  # MVTec layout mirrored
    for mask, size in ((out / f"{non_square.stem}_mask.png", (80, 50)), (mvtec, (64, 64))):
        with Image.open(mask) as im:
            assert im.size == size and im.mode == "L"
            assert set(np.unique(np.asarray(im))) <= {0, 255}
    everything = invoke("export-masks", bundle, non_square, "--out", out, "--overwrite", "--threshold", "0")
    assert everything.exit_code == 0
    assert (np.asarray(Image.open(out / f"{non_square.stem}_mask.png")) == 255).all()


# ------------------------------------------------------------------------- benchmark


@pytest.fixture(scope="module")
def maps_dir(bundle, category_dir, tmp_path_factory) -> Path:
    """`decodiff localize` over the test split: TIFFs in MVTec's evaluation layout."""
    from typer.testing import CliRunner

    from decodiff_cli.cli import app

    out = tmp_path_factory.mktemp("maps") / "maps"
    result = CliRunner().invoke(app, ["localize", str(bundle), str(category_dir / "test"), "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out


def check_benchmark_json(path: Path) -> None:
    data = json.loads(path.read_text())
    for values in (data["mean"], data["categories"][CATEGORY]):
        assert set(values) == set(METRICS)
        assert all(0.0 <= values[k] <= 1.0 for k in METRICS), values


def test_localize_maps_follow_mvtec_layout(maps_dir, test_images):
    for image in test_images:
        defect = image.parent.name
        assert (maps_dir / CATEGORY / "test" / defect / f"{image.stem}.tiff").is_file()


def test_benchmark_with_bundle(invoke, bundle, category_dir, tmp_path):
    report = tmp_path / "bundle.json"
    result = invoke("benchmark", category_dir, "--bundle", bundle, "--json", report, "--markdown", tmp_path / "t.md")
    assert result.exit_code == 0, result.output
    check_benchmark_json(report)
    assert json.loads(report.read_text())["speed"]["device"] == "cpu"
    assert "I-AUROC" in (tmp_path / "t.md").read_text()


def test_benchmark_with_maps(invoke, synth_root, maps_dir, tmp_path):
    report = tmp_path / "maps.json"
    result = invoke("benchmark", synth_root, "--maps", maps_dir, "--json", report, "--plots", tmp_path / "plots", "--per-defect")
    assert result.exit_code == 0, result.output
    check_benchmark_json(report)
    defects = json.loads(report.read_text())["defects"][CATEGORY]
    assert defects and all(f"  {kind}" in result.output for kind in defects)
    assert (tmp_path / "plots" / f"{CATEGORY}_curves.png").is_file()


def test_benchmark_native_reads_localize_tiffs_as_the_bundle_scores(invoke, bundle, synth_root, maps_dir, tmp_path):
    """The TIFFs `localize` writes, at the original resolution, give the bundle's own pixel
    metrics under --protocol native (no resampling on either side)."""
    reports = {}
    for source, value in (("--bundle", bundle), ("--maps", maps_dir)):
        reports[source] = tmp_path / f"{source[2:]}.json"
        result = invoke("benchmark", synth_root, source, value, "--protocol", "native", "--json", reports[source])
        assert result.exit_code == 0, result.output
        assert "native protocol" in result.stdout and "resized" not in result.stderr
    bundle_run, maps_run = (json.loads(reports[s].read_text()) for s in ("--bundle", "--maps"))
    assert bundle_run["protocol"] == maps_run["protocol"] == "native"
    for key in ("pixel_auroc", "pixel_ap", "pixel_f1max", "pixel_aupro"):
        assert maps_run["categories"][CATEGORY][key] == pytest.approx(bundle_run["categories"][CATEGORY][key], abs=1e-9)


def test_benchmark_needs_exactly_one_source(invoke, synth_root, bundle, maps_dir):
    neither = invoke("benchmark", synth_root)
    both = invoke("benchmark", synth_root, "--bundle", bundle, "--maps", maps_dir)
    for result in (neither, both):
        assert result.exit_code == 2 and "exactly one" in result.stderr


# ------------------------------------------------------------------------- calibrate


def test_calibrate_rewrites_thresholds(invoke, bundle_copy, category_dir, good_images, tmp_path):
    before = json.loads((bundle_copy / "calibration.json").read_text())
    result = invoke("calibrate", bundle_copy, category_dir / "test" / "good",
                    "--anomalous", category_dir / "test" / "stain")
    assert result.exit_code == 0, result.output
    after = json.loads((bundle_copy / "calibration.json").read_text())
    entry = after["categories"][CATEGORY]
    assert after != before
    assert entry["rule"].startswith("f1-optimal") and entry["num_normal"] == len(good_images)
    assert "f1-optimal" in result.stderr
    # Checksums were updated: the bundle still loads, and scores use the new threshold.
    scored = invoke("score", bundle_copy, good_images[0], "--format", "jsonl")
    assert scored.exit_code == 0, scored.output
    assert jsonl(scored.stdout)[0]["threshold"] == pytest.approx(entry["image_threshold"])


def test_a_model_with_a_non_square_input(invoke, category_dir, non_square, tmp_path):
    """--image-size WxH: resized whole to W x H (no crop); maps come back at each image's own size."""
    out = tmp_path / "wide"
    result = invoke("fit", category_dir, "--out", out, *TINY_FIT, "--image-size", "96x64", "--max-steps", "3")
    assert result.exit_code == 0, result.output
    config = json.loads((out / "config.json").read_text())
    assert (config["preprocess"]["image_size"], config["preprocess"]["image_height"]) == (96, 64)
    assert (config["denoiser"]["latent_size"], config["denoiser"]["latent_height"]) == (12, 8)
    assert "96x64" in invoke("info", out).stdout

    review = tmp_path / "review"
    result = invoke("localize", out, non_square.parent, "--out", review)
    assert result.exit_code == 0, result.output
    with Image.open(review / f"{non_square.stem}.tiff") as im:
        assert im.size == (80, 50)
    detector = Detector.load(out)
    prediction = next(detector.predict([non_square]))
    assert prediction.anomaly_map.shape == (50, 80) and prediction.error is None
    bench = invoke("benchmark", category_dir.parent, "--bundle", out, "--protocol", "full", "--json", tmp_path / "b.json")
    assert bench.exit_code == 0, bench.output

    refused = invoke("fit", category_dir, "--out", tmp_path / "x", *TINY_FIT, "--image-size", "96x64", "--resize", "120")
    assert refused.exit_code == 2 and "needs a square" in refused.stderr
    refused = invoke("fit", category_dir, "--out", tmp_path / "x", *TINY_FIT, "--image-size", "96x40")
    assert refused.exit_code == 2 and "multiple of 32" in refused.stderr


def noise_images(folder: Path, shape: tuple[int, int], levels: tuple[int, int], count: int = 8) -> Path:
    """`count` uniform-noise RGB images of (H, W) ``shape`` in ``folder``: a texture with no defect."""
    rng = np.random.default_rng(0)
    folder.mkdir()
    for i in range(count):
        Image.fromarray(rng.integers(*levels, (*shape, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def test_fit_keeps_the_shape_of_elongated_images_by_default(invoke, tmp_path):
    """The default `--image-size auto`: 4:1 line scans are seen at 512x128, not squeezed
    into 256x256, and the bundle records the shape it chose."""
    scans = noise_images(tmp_path / "scans", (100, 400), levels=(90, 110))
    out = tmp_path / "model"
    result = invoke("fit", scans, "--out", out, "--autoencoder", "pixel", "--model-size", "tiny",
                    "--batch-size", "2", "--max-steps", "2", "--views", "1")
    assert result.exit_code == 0, result.output
    assert "4.00:1 (median): the model sees 512x128" in result.output
    config = json.loads((out / "config.json").read_text())
    assert (config["preprocess"]["image_size"], config["preprocess"]["image_height"]) == (512, 128)
    assert config["preprocess"]["auto_shape"]
    prediction = next(Detector.load(out).predict([scans / "0.png"]))
    assert prediction.error is None and prediction.anomaly_map.shape == (100, 400)


def test_a_tiled_model_scores_large_images_at_their_own_resolution(invoke, tmp_path):
    """--tiles: the model sees 64x64 tiles cut from the images at their own size; a map
    stitched from the tiles covers each image, whatever its size, and finds a small spot."""
    normal = noise_images(tmp_path / "normal", (96, 160), levels=(100, 120))
    rng = np.random.default_rng(1)
    out = tmp_path / "model"
    result = invoke("fit", normal, "--out", out, "--tiles", *TINY_FIT, "--max-steps", "2", "--views", "2")
    assert result.exit_code == 0, result.output
    config = json.loads((out / "config.json").read_text())
    assert config["preprocess"]["tiles"] and config["anomaly_map"]["reference"] == "none"
    assert "tiles of 64x64" in invoke("info", out).stdout
    spot = rng.integers(100, 120, (120, 200, 3), dtype=np.uint8)  # a larger image than any in training
    spot[50:56, 140:146] = 255
    Image.fromarray(spot).save(tmp_path / "spot.png")
    detector = Detector.load(out)
    small, large = detector.predict([normal / "0.png", tmp_path / "spot.png"])
    assert small.anomaly_map.shape == (96, 160) and large.anomaly_map.shape == (120, 200)
    assert np.unravel_index(large.anomaly_map.argmax(), large.anomaly_map.shape) in \
        {(y, x) for y in range(46, 60) for x in range(136, 150)}
    review = tmp_path / "review"
    assert invoke("localize", out, tmp_path / "spot.png", "--out", review).exit_code == 0
    with Image.open(review / "spot_recon.png") as im:
        assert im.size == (200, 120)
