#!/usr/bin/env bash
# RoBERTa-mini and ModernBERT-mini MLM training steps, Kindling against transformers' same
# models, back to back on this machine with the same thread count (2): batch 32 x 128, vocab
# 8192, 15% masks. PyTorch stock and in its strongest form (the head at the masked rows only).
#
#   bash benches/compare/run_arch_compare.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
py="${KINDLING_PYTHON:?point KINDLING_PYTHON at a Python with torch + transformers 5 (the CI venv)}"
out=runs/compare
mkdir -p "$out"
RAYON_NUM_THREADS=2 cargo bench --bench mlm -- roberta modernbert | tee "$out/kindling-arch.txt"
"$py" benches/compare/hf_step_bench.py --threads 2 --only roberta,modernbert | tee "$out/pytorch-arch.jsonl"
python3 - "$out" <<'PY'
import json, re, sys
out = sys.argv[1]
k = {}
for line in open(f"{out}/kindling-arch.txt"):
    m = re.match(r"\|\s*step (\S+)-mini.*?\|\s*([\d.]+)\s*\|", line)
    if m:
        k[m.group(1)] = float(m.group(2))
p = {r["bench"]: r["tokens_per_s"] for r in map(json.loads, open(f"{out}/pytorch-arch.jsonl"))}
print("| model (32 x 128, 2 threads) | Kindling tok/s | PyTorch stock tok/s | PyTorch head at masked rows tok/s | ratio (vs stock / vs strongest) |")
print("|---|---|---|---|---|")
for arch, strong in [("roberta", "roberta-mini gathered"), ("modernbert", "modernbert-mini sparse")]:
    if arch in k:
        s, g = p[f"{arch}-mini"], p[strong]
        print(f"| {arch}-mini | {k[arch]:.0f} | {s:.0f} | {g:.0f} | {k[arch] / s:.2f}x / {k[arch] / g:.2f}x |")
PY
