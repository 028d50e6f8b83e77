#!/usr/bin/env bash
# Issue 7's GPU check, in one short run: train a few minutes with the paper's sizes
# (`--preset paper`: the 256-wide UNet, batch 128, an SD-VAE-shaped AutoencoderKL, bf16),
# then score, and print images/s for both.
#
#   bash benchmarks/gpu_paper_check.sh [OUT] [MINUTES]      # on a machine with a GPU
#   EXTRA="--model-size tiny --batch-size 4 --image-size 64 --resize 64" bash benchmarks/gpu_paper_check.sh /tmp/smoke 0.3   # CPU smoke test
#
# The GPU machine reaches no hub, so the autoencoder is AutoencoderKL with SD-VAE's
# architecture (4 latent channels, 8x) and random weights, written locally: throughput
# does not depend on the weights, detection quality does (it is not measured here).
# The images are examples/make_dataset.py's synthetic parts.
set -euo pipefail
OUT=${1:-/tmp/decodiff_gpu_check}
MINUTES=${2:-4}
EXTRA=${EXTRA:-}
rm -rf "$OUT" && mkdir -p "$OUT"

python examples/make_dataset.py "$OUT/data" --category part --train 256 --test 16 --size 256
python - "$OUT/sdvae_random" <<'EOF'
import sys
from diffusers import AutoencoderKL
AutoencoderKL(down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
              block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=4,
              sample_size=256).save_pretrained(sys.argv[1])
EOF
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
# shellcheck disable=SC2086
decodiff fit "$OUT/data/part" --out "$OUT/model" --preset paper --autoencoder "$OUT/sdvae_random" \
  --time-budget "$MINUTES" --mixed-precision bf16 $EXTRA
python - "$OUT/model/training_log.jsonl" <<'EOF'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
last = rows[-1]
print(f"training: {last['step']} steps, {last['images_per_s']:.1f} images/s (batch as configured), "
      f"{last['elapsed_s']:.0f} s, {last['processes']} process(es)")
EOF
decodiff benchmark "$OUT/data" --bundle "$OUT/model" --protocol full --json "$OUT/benchmark.json"
python - "$OUT/benchmark.json" <<'EOF'
import json, sys
speed = json.load(open(sys.argv[1]))["speed"]
print(f"scoring: {speed['images_per_s']:.1f} images/s; s/image by stage: {speed['seconds_per_image']}")
EOF
