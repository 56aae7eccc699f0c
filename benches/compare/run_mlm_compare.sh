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
#
# With SAME_RECIPE=1, a third run gives PyTorch Kindling's recipe too (batch 16, warmup-stable-
# decay, no dropout, the recipe's training mask rate; eval masks stay at 15% on every side), with
# its schedule sized by PYTORCH_B16_STEP_S (default 0.55 s, measured here), so the comparison
# separates the recipe from the engine.
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

rm -f "$out/pytorch-same-recipe.jsonl"
if [ "${SAME_RECIPE:-0}" = 1 ]; then
  rate=$(python3 -c "import tomllib; r=tomllib.load(open('recipes/bert-mini-mlm.toml','rb')); print(r['data']['mask']['rate'])")
  step_s=${PYTORCH_B16_STEP_S:-0.55}
  echo "== PyTorch + HF with Kindling's recipe (batch 16, wsd, no dropout, train mask $rate)" >&2
  "$venv/bin/python" benches/compare/hf_mlm_budget.py --tokenizer "$out/compare-kindling/tokenizer.json" \
    --budget-s "$budget" --steps "$(python3 -c "print(int($budget / $step_s))")" --lr 1e-3 --warmup 40 \
    --batch 16 --schedule wsd --decay-fraction 0.25 --dropout 0 --train-mask-rate "$rate" \
    | tee "$out/pytorch-same-recipe.jsonl"
fi

python3 - "$out" <<'PY'
import json, os, sys
out = sys.argv[1]
k = json.load(open(f"{out}/kindling.json"))
print(f"| side | steps | train s | eval loss | eval acc | unigram baseline |")
print(f"|---|---|---|---|---|---|")
print(f"| Kindling (recipes/bert-mini-mlm.toml) | {k['steps']} | {k['elapsed_s']:.0f} | {k['eval']['loss']:.4f} | {k['eval']['accuracy']:.4f} | {list(k['baseline'].values())[0]:.4f} |")
for name, label in [("pytorch.jsonl", "PyTorch + HF (HF settings)"), ("pytorch-same-recipe.jsonl", "PyTorch + HF (Kindling's recipe)")]:
    if not os.path.exists(f"{out}/{name}"):
        continue
    p = [json.loads(l) for l in open(f"{out}/{name}") if '"side"' in l][-1]
    print(f"| {label} | {p['steps']} | {p['train_s']:.0f} | {p['eval_loss']:.4f} | {p['eval_accuracy']:.4f} | {p['unigram_baseline']:.4f} |")
PY
