"""Image file -> model tensor, and anomaly maps back to the image's own geometry.

Geometry (``PreprocessConfig``, docs/method.md section 1): the image is resized to
``resize x resize`` (aspect ratio not kept, as in the paper), then centre-cropped to
``image_size``; with ``image_height`` (``--image-size WxH``) it is resized to W x H, no
crop; with ``tiles`` it keeps its own resolution (enlarged only below a tile) and
tiles.py cuts it. ``map_to_original`` undoes exactly that, so a map can be laid over the
user's picture.

Colour policy, decided once here so every command sees the same pixels:
- EXIF orientation is applied (a phone photo is scored the way it is displayed).
- Alpha is composited on black: a transparent pixel becomes black whatever colour
  happens to be stored under it (those hidden values are arbitrary and differ between
  editors, so dropping alpha would make identical-looking files score differently).
- 16-bit images are scaled by the full 0..65535 range (v / 257), never clipped at 255.
- Float images in [0, 1] are scaled by 255, in [0, 255] kept, anything else is
  stretched min..max (there is no other convention to rely on).
- Animated / multi-page files: the first frame.

Reading: a file's bytes are read in a worker thread within ``DECODIFF_READ_TIMEOUT``
seconds (60 by default; a FIFO or a hung mount would block forever), then decoded from
memory. Whatever goes wrong (the OS, Pillow, a file changed while read) is an
``ImageReadError`` naming the file, so one bad file never stops a batch.
"""

from __future__ import annotations

import io
import os
import re
import stat
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .config import PreprocessConfig
from .datasets import show_path

ImageSource = Union[str, os.PathLike, Image.Image, np.ndarray]


class ImageReadError(ValueError):
    """An image could not be read; the message is one sentence naming the file."""

    def __init__(self, name: str, problem: str) -> None:
        super().__init__(f"cannot read image {name}: {problem}.")
        self.name = name
        self.problem = problem


@dataclass
class LoadedImage:
    tensor: torch.Tensor  # float32 (3, S, S) in [-1, 1]
    original: Image.Image  # the RGB image before resizing
    original_size: tuple[int, int]  # (W, H)


# ---------------------------------------------------------------- files -> PIL image

READ_TIMEOUT_S = 60.0  # default bound on reading one file; DECODIFF_READ_TIMEOUT overrides
_READ_CHUNK = 1 << 20
_BYTES_PER_PIXEL = 8  # 16-bit RGBA, the widest common raw layout: caps what a file may hold


def read_timeout() -> float:
    """Seconds one file may take to read (``DECODIFF_READ_TIMEOUT``, else READ_TIMEOUT_S)."""
    raw = os.environ.get("DECODIFF_READ_TIMEOUT")
    if raw is None:
        return READ_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not 0 < value < float("inf"):
        raise ValueError(f"DECODIFF_READ_TIMEOUT must be a positive number of seconds, got {raw!r}")
    return value


def _max_file_bytes() -> int | None:
    """No image within Pillow's pixel limit needs more bytes than this (None: no limit)."""
    limit = Image.MAX_IMAGE_PIXELS
    return None if limit is None else _BYTES_PER_PIXEL * int(limit) + (64 << 20)


def _detail(e: BaseException) -> str:
    return str(e) or type(e).__name__


def _read_file(path: Path, name: str, cancelled: threading.Event) -> bytes:
    """Every byte of the file, or ImageReadError; runs in read_bytes' worker thread."""
    # os.path's tests answer False on any OSError (pathlib's may raise in Python 3.11).
    if os.path.islink(path) and not os.path.exists(path):
        raise ImageReadError(name, "it is a broken symbolic link")
    if not os.path.exists(path):
        raise ImageReadError(name, "the file does not exist")
    if os.path.isdir(path):
        raise ImageReadError(name, "it is a directory, not a file")
    try:
        fp = open(path, "rb", buffering=0)
    except PermissionError:
        raise ImageReadError(name, "permission denied") from None
    except OSError as e:
        raise ImageReadError(name, f"the file cannot be opened ({e.strerror or _detail(e)})") from None
    limit = _max_file_bytes()
    with fp:
        try:
            before = os.fstat(fp.fileno())
            regular = stat.S_ISREG(before.st_mode)
            if regular and limit is not None and before.st_size > limit:
                raise ImageReadError(name, f"it is too large ({before.st_size} bytes > limit {limit})")
            chunks, total = [], 0
            while not cancelled.is_set():
                # A FIFO or device (/dev/zero) has no size: stop one byte past the limit.
                chunk = fp.read(_READ_CHUNK if limit is None else min(_READ_CHUNK, limit + 1 - total))
                if not chunk:
                    break
                chunks.append(chunk)
                total += len(chunk)
                if limit is not None and total > limit:
                    raise ImageReadError(name, f"it is too large (over {limit} bytes)")
            after = os.fstat(fp.fileno())
        except OSError as e:
            raise ImageReadError(name, f"the file cannot be read ({e.strerror or _detail(e)})") from None
    if total == 0:
        raise ImageReadError(name, "the file is empty")
    # A file written to while we read it (a copy still in progress) would mix two versions.
    if regular and (total != after.st_size or (before.st_size, before.st_mtime_ns) != (after.st_size, after.st_mtime_ns)):
        raise ImageReadError(name, "the file changed while it was being read")
    return b"".join(chunks)


def read_bytes(path: Path) -> bytes:
    """The file's bytes, read in a worker thread within ``read_timeout()`` seconds.

    Opening a FIFO, or reading from a hung network mount, can block forever: the batch
    gives up on that file after the timeout (the worker is a daemon thread, left to end
    on its own) instead of waiting with it. Any failure is an ImageReadError naming it.
    """
    name = show_path(path)
    timeout = read_timeout()
    cancelled = threading.Event()
    outcome: list = []

    def work() -> None:
        try:
            outcome.append(_read_file(path, name, cancelled))
        except ImageReadError as e:
            outcome.append(e)
        except Exception as e:  # anything the OS or Python raises is this file's problem
            outcome.append(ImageReadError(name, f"the file cannot be read ({_detail(e)})"))

    worker = threading.Thread(target=work, name="decodiff-read", daemon=True)
    worker.start()
    worker.join(timeout)
    if not outcome:
        cancelled.set()
        raise ImageReadError(name, f"reading it took longer than {timeout:g} s (a FIFO, a device or a "
                                   f"hung network mount; DECODIFF_READ_TIMEOUT sets the limit)")
    if isinstance(outcome[0], ImageReadError):
        raise outcome[0]
    return outcome[0]


def _open_file(path: Path, orient: bool = True) -> Image.Image:
    """Read, fully decode and (``orient``) EXIF-orient a file; keep its native mode
    (I;16, F, P, ...).

    Decoding works on the bytes already in memory, so a file that changes afterwards
    cannot mix versions, and any exception Pillow raises becomes an ImageReadError.
    """
    return _decode(read_bytes(path), show_path(path), full=True, orient=orient)


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """(W, H) as stored (before EXIF orientation), from the header: the pixels are not decoded."""
    path = Path(os.fsdecode(path))
    return _decode(read_bytes(path), show_path(path), full=False).size


def decode_file(path: str | os.PathLike, orient: bool = False) -> Image.Image:
    """A file's image in its native mode (masks, float maps), or an ImageReadError naming it."""
    return _open_file(Path(os.fsdecode(path)), orient)


def _decode(data: bytes, name: str, full: bool, orient: bool = False) -> Image.Image:
    with warnings.catch_warnings():
        # Pillow's warnings about odd metadata would print source lines into a batch's
        # stderr; the file decodes anyway or fails with its own error below.
        warnings.simplefilter("ignore")
        # The bomb *warning* (between 1x and 2x Pillow's limit) becomes an error too:
        # a file that large is almost certainly not a photo of a part.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data))
            if full:
                # A full decode now: lazily-loaded truncated files would otherwise fail
                # (or, with LOAD_TRUNCATED_IMAGES, silently go grey) much later.
                img.load()
        except UnidentifiedImageError:
            raise ImageReadError(name, "it is not an image format Pillow can read") from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise ImageReadError(name, _too_large(e)) from None
        except Exception as e:  # Pillow raises OSError, SyntaxError, EOFError, ValueError, ...
            raise ImageReadError(name, f"the file is truncated or corrupt ({_detail(e)})") from None
        return _orient(img) if orient else img


def _orient(img: Image.Image) -> Image.Image:
    """Apply EXIF orientation; a corrupt EXIF block must not make a good image unreadable."""
    try:
        return ImageOps.exif_transpose(img)
    except Exception:
        return img.copy()


def _too_large(e: Exception) -> str:
    m = re.search(r"\((\d+) pixels\) exceeds limit of (\d+)", str(e))
    if m:
        return f"it is too large ({m.group(1)} pixels > limit {m.group(2)})"
    return "it is too large (over Pillow's decompression-bomb limit)"


# ------------------------------------------------------------------ any mode -> RGB


def _scale_to_uint8(a: np.ndarray, wide: bool | None = None) -> np.ndarray:
    """Numbers of any dtype -> uint8 0..255 (see the module docstring for the rules).

    ``wide``: integers are 16-bit (v / 257). None guesses: uint16 or any value > 255
    (a numpy array of Python ints holding 0..255 is 8-bit, whatever its dtype).
    """
    if a.dtype == np.uint8:
        return a
    if a.dtype == np.bool_:
        return a.astype(np.uint8) * 255
    if np.issubdtype(a.dtype, np.integer):
        if wide is None:
            wide = a.dtype.kind == "u" and a.dtype.itemsize == 2 or bool(a.size and a.max() > 255)
        scaled = a.astype(np.float64) / 257.0 if wide else a.astype(np.float64)
        return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
    a = np.nan_to_num(a.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
    if lo >= 0 and hi <= 1:
        a = a * 255.0
    elif not (lo >= 0 and hi <= 255):
        a = (a - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(a)
    return np.clip(np.rint(a), 0, 255).astype(np.uint8)


def _composite_on_black(rgba: Image.Image) -> Image.Image:
    a = np.asarray(rgba.convert("RGBA"), dtype=np.uint16)
    rgb = (a[..., :3] * a[..., 3:4] + 127) // 255
    return Image.fromarray(rgb.astype(np.uint8), "RGB")


def _to_rgb(img: Image.Image, name: str) -> Image.Image:
    try:
        return _rgb(img, name)
    except ImageReadError:
        raise
    except Exception as e:  # a decoded but malformed image (odd mode, size or palette)
        raise ImageReadError(name, f"its {img.mode} pixels cannot be converted to RGB ({_detail(e)})") from None


def _rgb(img: Image.Image, name: str) -> Image.Image:
    mode = img.mode
    if mode.startswith("I") or mode == "F":  # I;16*, I, F: wider than 8 bits
        grey = _scale_to_uint8(np.asarray(img), wide=True)
        return Image.fromarray(grey, "L").convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        return _composite_on_black(img)
    try:
        return img.convert("RGB")  # L, 1, P, CMYK, YCbCr, HSV, RGB (a copy)
    except (ValueError, OSError) as e:
        raise ImageReadError(name, f"its colour mode {mode} is not supported ({e})") from None


def _from_array(arr: np.ndarray) -> Image.Image:
    name = "(numpy array)"
    a = np.asarray(arr)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[..., 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (3, 4)) or a.size == 0:
        raise ImageReadError(name, f"shape {a.shape} is not HxW, HxWx3 or HxWx4")
    if not (np.issubdtype(a.dtype, np.number) or a.dtype == np.bool_):
        raise ImageReadError(name, f"dtype {a.dtype} is not numeric")
    if a.ndim == 3 and a.shape[2] == 4:
        rgba = np.concatenate([_scale_to_uint8(a[..., :3]), _scale_to_uint8(a[..., 3:])], -1)
        return _composite_on_black(Image.fromarray(np.ascontiguousarray(rgba), "RGBA"))
    u8 = np.ascontiguousarray(_scale_to_uint8(a))
    return Image.fromarray(u8, "L" if u8.ndim == 2 else "RGB").convert("RGB")


def read_image(source: ImageSource) -> Image.Image:
    """A path, PIL image or numpy array -> an 8-bit RGB PIL image (see module notes)."""
    if isinstance(source, np.ndarray):
        try:
            return _from_array(source)
        except ImageReadError:
            raise
        except Exception as e:  # e.g. an object array that only looks numeric
            raise ImageReadError("(numpy array)", _detail(e)) from None
    if isinstance(source, Image.Image):
        return _to_rgb(_orient(source), "(PIL image)")
    if isinstance(source, (str, bytes, os.PathLike)):
        path = Path(os.fsdecode(source))
        return _to_rgb(_open_file(path), show_path(path))
    raise TypeError(f"expected a path, PIL image or numpy array, got {type(source).__name__}")


# --------------------------------------------------------------- geometry both ways


def _crop_box(pre: PreprocessConfig) -> tuple[int, int, int, int]:
    off = (pre.resize - pre.image_size) // 2
    return off, off, off + pre.image_size, off + pre.image_size


def image_to_tensor(img: Image.Image, pre: PreprocessConfig) -> torch.Tensor:
    """RGB image -> float32 (3, H, W) in [-1, 1]: bicubic resize, then centre crop (a
    square input) or resize to W x H (``pre.image_height``)."""
    if img.mode != "RGB":
        img = _to_rgb(img, "(PIL image)")
    # Pillow's resize is antialiased when shrinking (the filter support widens).
    if pre.tiles:  # the frame tiles are cut from: the image itself, enlarged only below a tile
        from decodiff_cli.tiles import frame_size

        size = frame_size(*img.size, pre)
        img = img if size == img.size else img.resize(size, Image.Resampling.BICUBIC)
    elif pre.image_height:
        img = img.resize((pre.image_size, pre.image_height), Image.Resampling.BICUBIC)
    else:
        img = img.resize((pre.resize, pre.resize), Image.Resampling.BICUBIC).crop(_crop_box(pre))
    a = torch.from_numpy(np.asarray(img, dtype=np.float32).copy())
    return (a.permute(2, 0, 1) / 127.5 - 1.0).contiguous()


def load_image(source: ImageSource, pre: PreprocessConfig) -> LoadedImage:
    img = read_image(source)
    return LoadedImage(tensor=image_to_tensor(img, pre), original=img, original_size=img.size)


def map_to_original(
    map_: np.ndarray, original_size: tuple[int, int], pre: PreprocessConfig
) -> np.ndarray:
    """(S, S) model-space map -> (H, W) float32 over the original image.

    The map goes back into the resize x resize frame (zeros where the crop cut: nothing
    was seen there), then is resized bilinearly to the original W x H.
    """
    m = np.asarray(map_, dtype=np.float32)
    if pre.tiles:  # a stitched map over the frame (tiles.py): the whole image
        frame = m
    elif m.shape != pre.shape:
        raise ValueError(f"map shape {m.shape} is not {pre.shape}")
    elif pre.image_height:  # no crop: the map covers the whole image
        frame = m
    else:
        frame = np.zeros((pre.resize, pre.resize), dtype=np.float32)
        left, top, right, bottom = _crop_box(pre)
        frame[top:bottom, left:right] = m
    w, h = original_size
    out = Image.fromarray(frame, "F").resize((int(w), int(h)), Image.Resampling.BILINEAR)
    return np.asarray(out, dtype=np.float32).copy()


def mask_levels(source: ImageSource) -> np.ndarray:
    """A mask -> float array in [0, 1] (max over colour channels, alpha ignored)."""
    if isinstance(source, (str, bytes, os.PathLike)):
        path = Path(os.fsdecode(source))
        source, name = _open_file(path), show_path(path)
    else:
        name = "(mask)"
    if isinstance(source, Image.Image):
        numeric = source.mode in ("1", "L", "F") or source.mode.startswith("I")
        a = np.asarray(source if numeric else source.convert("RGB"))
    else:
        a = np.asarray(source)
    if a.ndim == 3:
        a = a[..., :3].max(axis=2)
    if a.ndim != 2 or a.size == 0:
        raise ImageReadError(name, f"a mask must be 2-D, got shape {a.shape}")
    if a.dtype == np.bool_ or (a.min() >= 0 and a.max() <= 1):
        return a.astype(np.float64)  # bool, float 0..1, or 0/1 integers (VisA's masks)
    if a.max() <= 255:
        full = 255.0  # 8-bit masks (0/255), whatever the dtype
    elif a.dtype.kind in "iu":
        full = 65535.0  # 16-bit masks (I;16 / I modes, uint16 arrays)
    else:
        full = float(a.max())
    return np.clip(a.astype(np.float64) / full, 0, 1)


def mask_to_model_space(mask_img: ImageSource, pre: PreprocessConfig) -> np.ndarray:
    """Ground-truth mask -> bool (H, W), same geometry as the image, cut at half range."""
    levels = Image.fromarray(mask_levels(mask_img).astype(np.float32), "F")
    if pre.tiles:
        from decodiff_cli.tiles import frame_size

        return np.asarray(levels.resize(frame_size(*levels.size, pre), Image.Resampling.BILINEAR)) > 0.5
    if pre.image_height:
        return np.asarray(levels.resize((pre.image_size, pre.image_height), Image.Resampling.BILINEAR)) > 0.5
    levels = levels.resize((pre.resize, pre.resize), Image.Resampling.BILINEAR)
    return np.asarray(levels.crop(_crop_box(pre))) > 0.5
