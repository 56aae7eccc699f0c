#!/usr/bin/env bash
# Kindling vs PyTorch + HF transformers on the MLM slice: same data (Kindling's tokenizer and
# packing), same model shape (BERT-mini: h256, L4, A4), same wall-clock budget, back to back on
# this machine. Not run in CI (needs PyTorch: ~3 GB of wheels).
#
#   bash benches/compare/run_mlm_compare.sh [BUDGET_SECONDS]
#
# Kindling runs recipes/bert-mini-mlm.toml first; PyTorch then gets the same training time
# (Kindling's measured training-loop seconds, or BUDGET_SECONDS if given) with HF's usual
# settings for this shape (batch 32, lr 1e-3, warmup 40, dropout 0.1: the calibration run of the
# MLM-slice issue) and a linear schedule sized to the budget (budget / 1.19 s, PyTorch's measured
# step time here, so its learning rate reaches zero as the time runs out). Prints both final eval losses
# (masked-token cross-entropy on the held-out last 5% of blocks) next to the unigram baseline.
set -euo pipefail
cd "$(dirname "$0")/../.."
budget=${1:-}
venv=benches/compare/.venv
if ! "$venv/bin/python" -c "import torch, transformers" 2>/dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet torch transformers numpy
fi
cargo build --release
out=runs/compare
mkdir -p "$out"

echo "== Kindling: recipes/bert-mini-mlm.toml" >&2
./target/release/kindling pretrain recipes/bert-mini-mlm.toml --overwrite --set name='"compare-kindling"' \
  --set runs_dir="\"$out\"" | tee "$out/kindling.json"

if [ -z "$budget" ]; then
  budget=$(python3 -c "import json; print(json.load(open('$out/kindling.json'))['elapsed_s'])")
fi
echo "== PyTorch + HF: same tokenizer, data and shape, ${budget}s budget" >&2
"$venv/bin/python" benches/compare/hf_mlm_budget.py --tokenizer "$out/compare-kindling/tokenizer.json" \
  --budget-s "$budget" --steps "$(python3 -c "print(int($budget / 1.19))")" --lr 1e-3 --warmup 40 | tee "$out/pytorch.jsonl"

python3 - "$out" <<'PY'
import json, sys
out = sys.argv[1]
k = json.load(open(f"{out}/kindling.json"))
p = [json.loads(l) for l in open(f"{out}/pytorch.jsonl") if '"side"' in l][-1]
print(f"| side | steps | train s | eval loss | eval acc | unigram baseline |")
print(f"|---|---|---|---|---|---|")
print(f"| Kindling | {k['steps']} | {k['elapsed_s']:.0f} | {k['eval']['loss']:.4f} | {k['eval']['accuracy']:.4f} | {list(k['baseline'].values())[0]:.4f} |")
print(f"| PyTorch + HF | {p['steps']} | {p['train_s']:.0f} | {p['eval_loss']:.4f} | {p['eval_accuracy']:.4f} | {p['unigram_baseline']:.4f} |")
PY
