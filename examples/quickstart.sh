#!/usr/bin/env bash
# decodiff quick start: install decodiff (with its test extra), make a small generated
# dataset, fit a model with the default settings (the packaged TAEF2 autoencoder, no
# download) for a fixed number of steps, then score, localize, export masks and benchmark.
# A fixed step count, not a time budget, and the benchmark in fp32 (the default --dtype auto
# uses bf16 where the CPU has it): the figures are the same on a fast or a slow CPU.
# Everything lands in ./quickstart/ (override: $1).
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
work="${1:-quickstart}"
steps="${DECODIFF_QUICKSTART_STEPS:-200}"

if ! python3 -c "import decodiff_cli, pytest" >/dev/null 2>&1; then
  echo "installing decodiff (CPU build of torch) ..."
  python3 -m pip install --quiet "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu 2>/dev/null \
    || python3 -m pip install --quiet "torch==2.13.0" 2>/dev/null || python3 -m pip install --quiet torch
  python3 -m pip install --quiet -e "$here[test]"
fi

mkdir -p "$work"
data="$work/data"
[ -d "$data/tile" ] || python3 "$here/examples/make_dataset.py" "$data" --category tile --size 128 --train 60 --test 6

decodiff fit "$data/tile" --out "$work/model" --overwrite --image-size 128 --max-steps "$steps"
decodiff info "$work/model"

set +e  # exit code 1/3 from scoring are information, not failure, here
decodiff score "$work/model" "$data/tile/test" --format csv --output "$work/scores.csv"
decodiff localize "$work/model" "$data/tile/test" --out "$work/localize" --overwrite
decodiff export-masks "$work/model" "$data/tile/test" --out "$work/masks" --overwrite --min-area 20
decodiff benchmark "$data" --bundle "$work/model" --protocol full --dtype fp32 --json "$work/benchmark.json"
set -e

echo
echo "results:"
echo "  scores:    $work/scores.csv"
echo "  gallery:   $work/localize/index.html"
echo "  masks:     $work/masks/"
echo "  metrics:   $work/benchmark.json"
