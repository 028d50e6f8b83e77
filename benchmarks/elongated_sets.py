"""Issue 20 ablation (one-off): elongated test sets in MVTec layout, cut from the shared
data into a folder outside the project (the data are never copied into it).

    python benchmarks/elongated_sets.py ../shared/data /tmp/elong

- bottle_strip: the centre band of every bottle image, rows 115-269 of 384 (384x154, 2.5:1);
  defect images whose defect lies outside the band are left out.
- tile_long: the magnetic-tile images elongated 1.8:1 or more, the tall ones turned to wide.
"""
import sys
from pathlib import Path

import numpy as np
from PIL import Image

shared, out = Path(sys.argv[1]), Path(sys.argv[2])
bottle, tiles = shared / "mvtec_bottle/bottle", shared / "magnetic_tile/magnetic_tile"
ROWS = (115, 269)


def save(im, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path)


def band(path):
    im = Image.open(path)
    return im.crop((0, ROWS[0], im.size[0], ROWS[1]))


for f in sorted((bottle / "train/good").glob("*.png")):
    save(band(f), out / "bottle_strip/train/good" / f.name)
for f in sorted((bottle / "test").glob("*/*.png")):
    kind = f.parent.name
    if kind != "good":
        mask = bottle / "ground_truth" / kind / f"{f.stem}_mask.png"
        if np.asarray(band(mask)).max() == 0:
            continue
        save(band(mask), out / "bottle_strip/ground_truth" / kind / mask.name)
    save(band(f), out / "bottle_strip/test" / kind / f.name)


def long_and_turned(path):
    width, height = Image.open(path).size
    return max(width, height) / min(width, height) >= 1.8, height > width


def put(src, dst, turn):
    im = Image.open(src)
    save(im.transpose(Image.Transpose.ROTATE_90) if turn else im, dst)


for f in sorted((tiles / "train/good").iterdir()):
    keep, turn = long_and_turned(f)
    if keep:
        put(f, out / "tile_long/train/good" / f.name, turn)
for f in sorted((tiles / "test").glob("*/*")):
    (keep, turn), kind = long_and_turned(f), f.parent.name
    if keep:
        put(f, out / "tile_long/test" / kind / f.name, turn)
        if kind != "good":
            mask = next((tiles / "ground_truth" / kind).glob(f.stem + "*"))
            put(mask, out / "tile_long/ground_truth" / kind / mask.name, turn)
