"""images.py: every kind of file becomes the same RGB tensor; failures say which file."""

from __future__ import annotations

import io
import itertools
import os
import threading

import numpy as np
import pytest
from PIL import Image

from decodiff_cli.config import PreprocessConfig
from decodiff_cli.images import (
    ImageReadError,
    image_to_tensor,
    load_image,
    map_to_original,
    mask_to_model_space,
    read_image,
)

PRE = PreprocessConfig(image_size=32, resize=32)
CROP = PreprocessConfig(image_size=32, resize=40)


def _rgb(img: Image.Image, xy=(0, 0)) -> tuple[int, int, int]:
    assert img.mode == "RGB"
    return img.getpixel(xy)


# ------------------------------------------------------------------------ modes


def test_greyscale_bilevel_and_cmyk(tmp_path):
    Image.new("L", (7, 5), 100).save(tmp_path / "l.png")
    Image.new("1", (7, 5), 1).save(tmp_path / "b.png")
    Image.new("CMYK", (7, 5), (0, 0, 0, 0)).save(tmp_path / "c.jpg")
    Image.new("CMYK", (7, 5), (0, 255, 255, 0)).save(tmp_path / "c.tif")
    assert _rgb(read_image(tmp_path / "l.png")) == (100, 100, 100)
    assert _rgb(read_image(tmp_path / "b.png")) == (255, 255, 255)
    assert min(_rgb(read_image(tmp_path / "c.jpg"))) > 240  # no ink: white
    r, g, b = _rgb(read_image(tmp_path / "c.tif"))
    assert r > 200 and g < 50 and b < 50  # magenta + yellow ink: red


def test_palette_with_transparency_and_alpha_composite_on_black(tmp_path):
    p = Image.new("P", (4, 4), 1)
    p.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
    p.putpixel((0, 0), 0)
    p.save(tmp_path / "p.png", transparency=1)
    out = read_image(tmp_path / "p.png")
    assert _rgb(out, (1, 1)) == (0, 0, 0)  # the transparent index becomes black
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[..., :3] = (200, 100, 50)
    rgba[0, 0, 3] = 255
    rgba[0, 1, 3] = 128
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    out = read_image(tmp_path / "a.png")
    assert _rgb(out, (0, 0)) == (200, 100, 50)
    assert _rgb(out, (1, 0)) == (100, 50, 25)
    assert _rgb(out, (0, 1)) == (0, 0, 0)
    Image.new("LA", (3, 3), (90, 0)).save(tmp_path / "la.png")
    assert _rgb(read_image(tmp_path / "la.png")) == (0, 0, 0)


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_16_bit_greyscale_scaled_by_full_range(tmp_path, suffix):
    a = np.array([[0, 257 * 100, 32768, 65535]], dtype=np.uint16)
    Image.fromarray(a).save(tmp_path / f"g{suffix}")
    out = np.asarray(read_image(tmp_path / f"g{suffix}"))[0, :, 0]
    assert out.tolist() == [0, 100, 128, 255]


def test_mode_i_and_float_tiff(tmp_path):
    Image.fromarray(np.array([[0, 65535, 70000]], np.int32), "I").save(tmp_path / "i.tif")
    assert np.asarray(read_image(tmp_path / "i.tif"))[0, :, 0].tolist() == [0, 255, 255]
    Image.fromarray(np.array([[0.0, 0.5, 1.0]], np.float32), "F").save(tmp_path / "f.tif")
    assert np.asarray(read_image(tmp_path / "f.tif"))[0, :, 0].tolist() == [0, 128, 255]
    Image.fromarray(np.array([[-3.0, 0.0, 5.0]], np.float32), "F").save(tmp_path / "w.tif")
    assert np.asarray(read_image(tmp_path / "w.tif"))[0, :, 0].tolist() == [0, 96, 255]


def test_animated_gif_first_frame(tmp_path):
    frames = [Image.new("RGB", (6, 6), c) for c in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(tmp_path / "a.gif", save_all=True, append_images=frames[1:], duration=50)
    r, g, b = _rgb(read_image(tmp_path / "a.gif"))
    assert r > 200 and b < 50


@pytest.mark.parametrize(
    "arr, expected",
    [
        (np.full((3, 4), 7, np.uint8), (7, 7, 7)),
        (np.full((3, 4, 3), 65535, np.uint16), (255, 255, 255)),
        (np.full((3, 4, 3), 0.5, np.float32), (128, 128, 128)),
        (np.full((3, 4, 4), 1.0, np.float64), (255, 255, 255)),
        (np.full((3, 4), 200, np.int64), (200, 200, 200)),
        (np.ones((3, 4, 1), bool), (255, 255, 255)),
    ],
)
def test_numpy_arrays(arr, expected):
    out = read_image(arr)
    assert out.size == (4, 3) and _rgb(out) == expected


def test_bad_array_shape():
    with pytest.raises(ImageReadError, match="shape"):
        read_image(np.zeros((2, 3, 5)))


def test_exif_rotated_jpeg_comes_out_rotated(tmp_path):
    img = Image.new("RGB", (40, 20), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 20, 20))  # left half red
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    img.save(tmp_path / "r.jpg", exif=exif, quality=95)
    out = read_image(tmp_path / "r.jpg")
    assert out.size == (20, 40)
    r, _, b = _rgb(out, (10, 5))  # the left half is now on top
    assert r > 200 and b < 60


# ------------------------------------------------------------------- failures


def _png_bytes(size=64) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (size, size, 3), np.uint8)).save(
        buf, "PNG"
    )
    return buf.getvalue()


def _jpeg_bytes() -> bytes:
    buf = io.BytesIO()
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)
    Image.fromarray(noise).save(buf, "JPEG")
    return buf.getvalue()


@pytest.mark.parametrize(
    "name, make, problem",
    [
        ("empty.png", lambda p: p.write_bytes(b""), "empty"),
        ("cut.png", lambda p: p.write_bytes(_png_bytes()[:2000]), "truncated"),
        ("cut.jpg", lambda p: p.write_bytes(_jpeg_bytes()[:1500]), "truncated"),
        ("text.png", lambda p: p.write_text("hello, not an image\n"), "not an image"),
        ("folder.png", lambda p: p.mkdir(), "directory"),
        ("missing.png", lambda p: None, "does not exist"),
        ("dangling.png", lambda p: p.symlink_to(p.parent / "nowhere.png"), "broken symbolic"),
    ],
)
def test_failures_name_the_file(tmp_path, name, make, problem):
    path = tmp_path / name
    make(path)
    with pytest.raises(ImageReadError, match=problem) as info:
        read_image(path)
    assert name in str(info.value)
    assert isinstance(info.value, ValueError)


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root reads anything")
def test_unreadable_file(tmp_path):
    path = tmp_path / "secret.png"
    path.write_bytes(_png_bytes(4))
    path.chmod(0)
    with pytest.raises(ImageReadError, match="permission denied"):
        read_image(path)


def test_permission_denied_simulated(tmp_path, monkeypatch):
    """The same path as above, exercised even when the tests run as root."""
    import decodiff_cli.images as images

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    path = tmp_path / "locked.png"
    path.write_bytes(_png_bytes(4))
    monkeypatch.setattr(images, "open", denied, raising=False)
    with pytest.raises(ImageReadError, match="locked.png.*permission denied"):
        read_image(path)


def test_a_file_that_grows_while_being_read(tmp_path, monkeypatch):
    """A copy still in progress: bytes appended between two reads are never decoded as one file."""
    import decodiff_cli.images as images

    path = tmp_path / "copying.png"
    path.write_bytes(_png_bytes(64))
    real_open = open

    class Growing(io.FileIO):
        def read(self, size=-1):
            chunk = super().read(size)
            if self.tell() == 256:  # after the first chunk, the writer adds its last bytes
                with real_open(path, "ab") as more:
                    more.write(b"\0" * 16)
            return chunk

    monkeypatch.setattr(images, "_READ_CHUNK", 256)
    monkeypatch.setattr(images, "open", lambda p, mode, buffering=-1: Growing(p, "rb"), raising=False)
    with pytest.raises(ImageReadError, match="copying.png.*changed while it was being read"):
        read_image(path)


def test_files_rewritten_deleted_and_cut_meanwhile(tmp_path):
    """Another process keeps replacing, cutting and deleting the file: each read gives an
    image or an ImageReadError, nothing else."""
    path = tmp_path / "busy.png"
    whole = _png_bytes(48)
    stop = threading.Event()

    def churn():
        for i in itertools.count():
            if stop.is_set():
                return
            if i % 3 == 2:
                path.unlink(missing_ok=True)
            else:
                with open(path, "wb") as f:
                    f.write(whole[: len(whole) // (1 + i % 3)])

    writer = threading.Thread(target=churn, daemon=True)
    writer.start()
    sizes = set()
    try:
        for _ in range(300):
            try:
                sizes.add(read_image(path).size)
            except ImageReadError as err:  # any other exception fails the test
                assert "busy.png" in str(err)
    finally:
        stop.set()
        writer.join()
    assert sizes <= {(48, 48)}  # never a mix of two versions that happens to decode


def test_read_timeout_setting(monkeypatch):
    from decodiff_cli.images import READ_TIMEOUT_S, read_timeout

    monkeypatch.delenv("DECODIFF_READ_TIMEOUT", raising=False)
    assert read_timeout() == READ_TIMEOUT_S
    monkeypatch.setenv("DECODIFF_READ_TIMEOUT", "2.5")
    assert read_timeout() == 2.5
    for bad in ("0", "-1", "soon", "inf"):
        monkeypatch.setenv("DECODIFF_READ_TIMEOUT", bad)
        with pytest.raises(ValueError, match="DECODIFF_READ_TIMEOUT must be a positive number"):
            read_timeout()


@pytest.mark.parametrize("limit", [300, 100])  # 400 pixels: the warning, then the error
def test_decompression_bomb(tmp_path, monkeypatch, limit):
    Image.new("L", (20, 20)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
    with pytest.raises(ImageReadError, match=r"too large \(400 pixels > limit \d+\)"):
        read_image(tmp_path / "big.png")


# ------------------------------------------------------------------- geometry


@pytest.mark.parametrize("size", [(1, 1), (1, 300), (300, 2), (100, 60)])
def test_tiny_thin_and_non_square(size):
    loaded = load_image(Image.new("RGB", size, (255, 255, 255)), CROP)
    assert loaded.tensor.shape == (3, 32, 32) and loaded.tensor.dtype.is_floating_point
    assert loaded.original_size == size
    assert float(loaded.tensor.min()) == pytest.approx(1.0)
    back = map_to_original(np.ones((32, 32), np.float32), size, CROP)
    assert back.shape == (size[1], size[0]) and back.dtype == np.float32


def test_tensor_range():
    a = np.zeros((50, 70, 3), np.uint8)
    a[:, 35:] = 255
    t = image_to_tensor(Image.fromarray(a), PRE)
    assert t.dtype.is_floating_point and t.shape == (3, 32, 32)
    assert float(t.min()) == -1.0 and float(t.max()) == 1.0


def test_map_to_original_identity_without_crop():
    m = np.random.default_rng(1).random((32, 32)).astype(np.float32)
    np.testing.assert_array_equal(map_to_original(m, (32, 32), PRE), m)
    const = map_to_original(np.full((32, 32), 0.3, np.float32), (90, 45), PRE)
    assert const.shape == (45, 90)
    np.testing.assert_allclose(const, 0.3, atol=1e-6)


def test_map_to_original_with_crop_puts_zeros_outside():
    m = np.ones((32, 32), np.float32)
    back = map_to_original(m, (40, 40), CROP)  # the original is the resize frame itself
    assert back[0, 0] == 0 and back[39, 39] == 0 and back[20, 20] == 1
    assert back[4:36, 4:36].min() == 1 and back.sum() == 32 * 32


def test_mask_geometry_matches_image():
    a = np.zeros((60, 100), np.uint8)
    a[10:30, 50:80] = 255
    img_t = image_to_tensor(Image.fromarray(a), CROP)
    bright = img_t[0].numpy() > 0
    for mask in (a, a > 0, (a > 0).astype(np.uint8), Image.fromarray(a)):
        m = mask_to_model_space(mask, CROP)
        assert m.dtype == bool and m.shape == (32, 32)
        assert (m != bright).sum() <= 12  # only edge pixels may differ


def test_mask_from_16_bit_file(tmp_path):
    a = np.zeros((8, 8), np.uint16)
    a[:, 4:] = 65535
    Image.fromarray(a).save(tmp_path / "m.png")
    m = mask_to_model_space(tmp_path / "m.png", PreprocessConfig(image_size=8, resize=8))
    assert m[:, 4:].all() and not m[:, :4].any()


def test_a_non_square_input_is_resized_whole_and_maps_go_back():
    pre = PreprocessConfig(image_size=64, resize=64, image_height=16)
    img = Image.new("RGB", (200, 60), (10, 20, 30))
    img.paste((250, 250, 250), (150, 0, 200, 60))  # a bright right quarter
    t = image_to_tensor(img, pre)
    assert t.shape == (3, 16, 64) and pre.shape == (16, 64)
    assert t[:, :, -8:].mean() > 0.9 and t[:, :, :40].mean() < -0.8  # nothing cropped away
    amap = np.zeros((16, 64), np.float32)
    amap[:, 48:] = 1.0
    back = map_to_original(amap, (200, 60), pre)
    assert back.shape == (60, 200) and back[:, 160:].min() > 0.9 and back[:, :140].max() < 0.1
    with pytest.raises(ValueError, match=r"\(16, 64\)"):
        map_to_original(np.zeros((64, 64), np.float32), (200, 60), pre)
    mask = Image.new("L", (200, 60))
    mask.paste(255, (150, 0, 200, 60))
    m = mask_to_model_space(mask, pre)
    assert m.shape == (16, 64) and m[:, 50:].all() and not m[:, :46].any()


def test_image_size_parses_a_side_or_width_x_height():
    from decodiff_cli.config import parse_image_size

    assert parse_image_size(256) == (256, 0) and parse_image_size("256") == (256, 0)
    assert parse_image_size("512x128") == (512, 128) and parse_image_size("320X320") == (320, 0)
    with pytest.raises(ValueError, match="WxH"):
        parse_image_size("wide")
    with pytest.raises(ValueError, match="needs a square"):
        PreprocessConfig(image_size=64, resize=80, image_height=32)


class Notes:
    def __init__(self):
        self.notes = []

    def note(self, text):
        self.notes.append(text)


def test_auto_shape_keeps_an_elongated_class_s_ratio_at_about_the_same_pixels(tmp_path):
    from decodiff_cli.config import auto_shape
    from decodiff_cli.fitting import choose_shape, median_aspect

    paths = []
    for i, size in enumerate([(1600, 400), (1580, 400), (1620, 410)]):
        paths.append(tmp_path / f"scan{i}.png")
        Image.new("RGB", size).save(paths[-1])
    assert median_aspect(paths) == pytest.approx(1620 / 410)
    assert auto_shape(4.0, 256) == (512, 128) and auto_shape(0.25, 256) == (128, 512)
    assert auto_shape(1.4, 256) == (256, 0) and auto_shape(1 / 1.4, 256) == (256, 0)  # near square: a square
    assert auto_shape(2.34, 256, step=32) == (384, 160) and auto_shape(2.0, 256, step=64) == (384, 192)
    auto, report = PreprocessConfig(auto_shape=True), Notes()
    chosen = choose_shape({"scans": 4.0}, auto, 32, report)
    assert (chosen.shape, chosen.resize, chosen.auto_shape) == ((128, 512), 512, True)
    assert "512x128" in report.notes[0] and "--image-size 256 keeps a square" in report.notes[0]
    assert choose_shape({"parts": 1.2}, auto, 32, Notes()) == auto
    # a square the user chose stays, with a hint; a WxH the user chose stays, silently
    square, report = PreprocessConfig(image_size=256, resize=256), Notes()
    assert choose_shape({"scans": 4.0}, square, 32, report) == square
    assert "--image-size 512x128" in report.notes[0]
    given, report = PreprocessConfig(image_size=512, resize=512, image_height=128, auto_shape=True), Notes()
    assert choose_shape({"scans": 0.5}, given, 32, report) == given and not report.notes


def test_image_size_auto_is_the_cpu_default_and_a_given_size_or_a_crop_turn_it_off():
    from decodiff_cli.presets import build_config

    assert build_config("cpu", {}).preprocess.auto_shape
    assert build_config("cpu", {"image_size": "auto"}).preprocess.auto_shape
    assert not build_config("cpu", {"image_size": "256"}).preprocess.auto_shape
    assert not build_config("cpu", {"image_size": "512x128"}).preprocess.auto_shape
    assert not build_config("cpu", {"resize": 288}).preprocess.auto_shape  # a centre crop is square
    assert not build_config("paper", {}).preprocess.auto_shape
    assert build_config("paper", {"image_size": "auto", "resize": 256}).preprocess.auto_shape
