#!/usr/bin/env bash
# The README's results table: 1,000-step fits with the default settings on the two real sets
# in ../shared (bottle and magnetic tile, per category; and one unified model, which the
# results page reports), then the benchmarks, and the trivial mean-latent baseline. Steps,
# not minutes, so that the figures do not depend on the CPU (1,000 steps: about what 30
# minutes buy on 2 cores). About 2.5 hours on 2 cores: the two per-category fits side by
# side, one thread each, then the unified fit on every core. Outputs land in ${1:-results/}.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
data="${DECODIFF_SHARED:-$here/../shared}/data"
out="${1:-results}"
mkdir -p "$out"
export OMP_NUM_THREADS=1

decodiff fit "$data/mvtec_bottle/bottle" --out "$out/bottle" --max-steps 1000 --overwrite &
decodiff fit "$data/magnetic_tile/magnetic_tile" --out "$out/tile" --max-steps 1000 --overwrite &
wait
env -u OMP_NUM_THREADS decodiff fit "$data/mvtec_bottle/bottle" "$data/magnetic_tile/magnetic_tile" --out "$out/unified" \
  --max-steps 1000 --overwrite

set +e  # a benchmark's own exit code is reported, not fatal to the rest
decodiff benchmark "$data/mvtec_bottle" --bundle "$out/bottle" --protocol paper --json "$out/bottle.json"
decodiff benchmark "$data/magnetic_tile" --bundle "$out/tile" --protocol full --json "$out/tile.json"
decodiff benchmark "$data/mvtec_bottle" --bundle "$out/unified" --protocol paper --infer-class --json "$out/unified_bottle.json"
decodiff benchmark "$data/magnetic_tile" --bundle "$out/unified" --protocol full --infer-class --json "$out/unified_tile.json"
for set in mvtec_bottle:paper magnetic_tile:full; do
  name="${set%%:*}"; protocol="${set##*:}"
  python3 "$here/examples/mean_latent_baseline.py" "$data/$name" --out "$out/baseline_$name" --protocol "$protocol" \
    && decodiff benchmark "$data/$name" --maps "$out/baseline_$name" --protocol "$protocol" --json "$out/baseline_$name.json"
done
