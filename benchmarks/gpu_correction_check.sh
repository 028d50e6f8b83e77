#!/usr/bin/env bash
# Issue 22's GPU check: does the correction escape the identity when training is not
# starved? Two fits on one MVTec category, then the correction-only metrics and the
# diagnostics (benchmarks/correction_diagnostics.py) of each:
#   1. `--preset paper` with the packaged TAEF2 (the GPU machine reaches no hub): its map is
#      the paper's, the correction alone;
#   2. the default `cpu` preset, for the minutes a CPU fit gets in hours: benchmarked with
#      its default map and with the novelty term off (the correction alone).
#
#   bash benchmarks/gpu_correction_check.sh CATEGORY_DIR OUT [PAPER_MINUTES] [CPU_MINUTES]
#   EXTRA="--model-size tiny --batch-size 4 --image-size 64 --resize 64" DIAG="--max-test 4 --max-train 4 --timesteps 2" \
#     bash benchmarks/gpu_correction_check.sh data/bottle /tmp/smoke 0.3 0.3     # CPU smoke test
#
# DECODIFF names the command (default `decodiff`; `python3 -m decodiff_cli` without an install);
# BUNDLES is where the fitted bundles go (default OUT).
# Each step writes its output under OUT and a failed step does not stop the next.
set -uo pipefail
DATA=$1
OUT=$2
PAPER_MINUTES=${3:-4}
CPU_MINUTES=${4:-2.5}
EXTRA=${EXTRA:-}
DIAG=${DIAG:-}
DECODIFF=${DECODIFF:-decodiff}
BUNDLES=${BUNDLES:-$OUT}
DEVICE=$(python3 -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")
here=$(dirname "$0")
mkdir -p "$OUT" "$BUNDLES"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || true

summary() {  # the last training-log row of a bundle
  python3 - "$1/training_log.jsonl" <<'EOF'
import json, sys
last = [json.loads(line) for line in open(sys.argv[1])][-1]
print(f"training: {last['step']} steps, {last['images_per_s']:.1f} images/s, {last['elapsed_s']:.0f} s")
EOF
}

evaluate() {  # NAME BUNDLE: per-defect metrics and the diagnostics
  $DECODIFF benchmark "$DATA" --bundle "$2" --protocol paper --per-defect --device "$DEVICE" \
    --json "$OUT/$1_benchmark.json" 2>&1 | tail -n 30
  # shellcheck disable=SC2086
  python3 "$here/correction_diagnostics.py" "$2" "$DATA" --device "$DEVICE" --json "$OUT/$1_diagnostics.json" $DIAG 2>/dev/null
}

echo "== 1. --preset paper, TAEF2, ${PAPER_MINUTES} min"
# shellcheck disable=SC2086
$DECODIFF fit "$DATA" --out "$BUNDLES/paper" --overwrite --preset paper --autoencoder taef2 \
  --time-budget "$PAPER_MINUTES" --mixed-precision bf16 $EXTRA 2>&1 | tail -n 5
summary "$BUNDLES/paper" && evaluate paper "$BUNDLES/paper"

echo "== 2. the cpu preset (default), ${CPU_MINUTES} min"
# shellcheck disable=SC2086
$DECODIFF fit "$DATA" --out "$BUNDLES/cpu" --overwrite --time-budget "$CPU_MINUTES" $EXTRA 2>&1 | tail -n 5
summary "$BUNDLES/cpu" && evaluate cpu "$BUNDLES/cpu"
# The same weights with the novelty term off: a copy whose config says so, checksums renewed.
rm -rf "$BUNDLES/cpu_correction" && cp -r "$BUNDLES/cpu" "$BUNDLES/cpu_correction"
python3 - "$BUNDLES/cpu_correction" <<'EOF'
import hashlib, json, sys
from pathlib import Path
folder = Path(sys.argv[1])
config = json.loads((folder / "config.json").read_text())
config["anomaly_map"]["novelty"] = False
(folder / "config.json").write_text(json.dumps(config, indent=2))
sums = json.loads((folder / "checksums.json").read_text())
sums = {name: hashlib.sha256((folder / name).read_bytes()).hexdigest() for name in sums}
(folder / "checksums.json").write_text(json.dumps(sums, indent=2))
EOF
$DECODIFF benchmark "$DATA" --bundle "$BUNDLES/cpu_correction" --protocol paper --per-defect --device "$DEVICE" \
  --json "$OUT/cpu_correction_benchmark.json" 2>&1 | tail -n 30
