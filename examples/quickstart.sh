#!/usr/bin/env bash
# decodiff quick start: install, make a small example dataset, fit a small model on a
# CPU with the weight-free `pixel` autoencoder (no download), then score, localize and
# export masks for the test images. Everything lands in ./quickstart/ (override: $1).
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
work="${1:-quickstart}"
minutes="${DECODIFF_QUICKSTART_MINUTES:-3}"

if ! command -v decodiff >/dev/null 2>&1; then
  python3 -m pip install --quiet "torch==2.13.0" 2>/dev/null || python3 -m pip install --quiet torch
  python3 -m pip install --quiet -e "$here"
fi

mkdir -p "$work"
data="$work/data"
[ -d "$data/tile" ] || python3 "$here/examples/make_dataset.py" "$data" --category tile --size 128 --train 60 --test 10

decodiff fit "$data/tile" --out "$work/model" --overwrite \
  --autoencoder pixel --model-size xs --image-size 128 --batch-size 16 --time-budget "$minutes"
decodiff info "$work/model"

set +e  # exit code 1/3 from scoring are information, not failure, here
decodiff score "$work/model" "$data/tile/test" --format csv --output "$work/scores.csv"
decodiff localize "$work/model" "$data/tile/test" --out "$work/localize" --overwrite
decodiff export-masks "$work/model" "$data/tile/test" --out "$work/masks" --overwrite --min-area 20
decodiff benchmark "$data" --bundle "$work/model" --protocol full --json "$work/benchmark.json"
set -e

echo
echo "results:"
echo "  scores:    $work/scores.csv"
echo "  gallery:   $work/localize/index.html"
echo "  masks:     $work/masks/"
echo "  metrics:   $work/benchmark.json"
