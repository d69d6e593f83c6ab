#!/usr/bin/env bash
# Transfer experiment: does a model trained on one corpus fine-tune to another faster than a model
# trained from scratch? Splits a corpus at the first blank line after 80% of its bytes (part A:
# the first plays, part B: the last ones), trains the baby GPT on A, then trains N steps on B
# three ways: full fine-tuning from A's checkpoint, LoRA (rank 8 on every block's four linear
# layers) from the same checkpoint, and from scratch. Each run ends with the validation loss over
# the whole validation split of B (the last 10% of B; the same text for all three), printed at
# the end.
#
# usage: scripts/transfer.sh [CORPUS] [OUT]   (env: KILN, PRE_STEPS=1000, N=300)
set -euo pipefail
KILN=${KILN:-target/release/kiln}
CORPUS=${1:-/work/shared/data/tinyshakespeare.txt}
OUT=${2:-runs/transfer}
PRE_STEPS=${PRE_STEPS:-1000}
N=${N:-300}
CONFIG=configs/shakespeare-char-baby.toml
mkdir -p "$OUT"

total=$(wc -c < "$CORPUS")
LC_ALL=C awk -v cut="$((total * 8 / 10))" -v a="$OUT/partA.txt" -v b="$OUT/partB.txt" \
  'BEGIN { RS = "\n\n"; ORS = "\n\n" } { start = n; n += length($0) + 2; print > (start <= cut ? a : b) }' \
  "$CORPUS"
# awk's last record gained a separator the corpus does not end with.
head -c "$((total - $(wc -c < "$OUT/partA.txt")))" "$OUT/partB.txt" > "$OUT/partB.tmp"
mv "$OUT/partB.tmp" "$OUT/partB.txt"

# The same schedule shape for the three runs on B: N steps, 30 of warm-up, cosine to lr/10,
# evaluations every 100 steps, and the whole validation split scored at the end.
B_SETTINGS=(--set "train.max_steps=$N" --set train.warmup_steps=30 --set train.eval_interval=100
  --set "train.checkpoint_interval=$N" --set train.final_eval_full_split=true)

if [ ! -e "$OUT/A/latest" ]; then
  "$KILN" train --quiet --config "$CONFIG" --data "$OUT/partA.txt" --out "$OUT/A" \
    --set "train.max_steps=$PRE_STEPS" --set "train.checkpoint_interval=$PRE_STEPS"
fi
"$KILN" train --quiet --config "$CONFIG" --data "$OUT/partB.txt" --out "$OUT/scratch" \
  --overwrite "${B_SETTINGS[@]}" 2> "$OUT/scratch.log"
"$KILN" train --quiet --init-from "$OUT/A" --data "$OUT/partB.txt" --out "$OUT/full" \
  --overwrite "${B_SETTINGS[@]}" --set train.lr=3e-4 --set train.min_lr=3e-5 2> "$OUT/full.log"
"$KILN" train --quiet --init-from "$OUT/A" --data "$OUT/partB.txt" --out "$OUT/lora" \
  --overwrite "${B_SETTINGS[@]}" --set lora.rank=8 --set lora.alpha=16 \
  --set 'lora.targets=["attn.qkv","attn.proj","mlp.fc","mlp.proj"]' 2> "$OUT/lora.log"

for run in scratch full lora; do
  printf '%-8s ' "$run"
  grep 'whole validation split' "$OUT/$run.log" || echo "(no whole-split loss: see $OUT/$run.log)"
done
