#!/usr/bin/env bash
# Kindling vs PyTorch + HF transformers, one training step at a time, back to back on this
# machine (the CPU-speed issue's table): MLM step tokens/s at batch 32 x 128, vocab 8192,
# dropout 0.1, 15% masks, for the tiny, mini and small shapes, masking sequences/s, and the
# SimCLR step's images/s (recipes/simclr-fashion-mnist.toml's model against
# simclr_reference.py's PyTorch copy of it).
# Kindling: `cargo bench --bench mlm`; PyTorch: hf_step_bench.py. Same thread count (2).
#
#   bash benches/compare/run_step_compare.sh
#
# Kindling projects only the masked positions onto the vocabulary, HF every position; each
# side's GFLOP/s counts the matmuls that side actually does. Peak: what torch.mm reaches on this
# machine, measured after the steps. Not run in CI (PyTorch is ~3 GB of wheels).
set -euo pipefail
cd "$(dirname "$0")/../.."
# A Python with torch + transformers: $KINDLING_PYTHON (e.g. the CI venv), else a venv here.
venv=benches/compare/.venv
py="${KINDLING_PYTHON:-$venv/bin/python}"
if ! "$py" -c "import torch, transformers" 2>/dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet torch transformers numpy
  py="$venv/bin/python"
fi
out=runs/compare
mkdir -p "$out"
cargo bench --bench mlm -- masking tiny mini small | tee "$out/kindling-steps.txt"
"$py" benches/compare/hf_step_bench.py --threads 2 | tee "$out/pytorch-steps.jsonl"
# The SimCLR step (2 x 256 views of 28x28, ResNet encoder; views made beforehand on both sides).
cargo bench --bench vision -- simclr | tee "$out/kindling-simclr.txt"
"$py" benches/compare/simclr_reference.py --out "$out/simclr-torch" --bench 8 --threads 2 \
  | tail -1 | tee "$out/pytorch-simclr.json"
# The machine's fp32 ceiling as PyTorch's BLAS sees it: best of five 2048^3 products on 2 threads
# (the project's machines differ: 156 GFLOP/s nominal on the Zen 3 ones, ~300 on AVX-512 Xeons).
"$py" - > "$out/matmul-peak.txt" <<'PY'
import time, torch
torch.set_num_threads(2)
a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
a @ b
best = min((lambda t: (a @ b, time.perf_counter() - t)[1])(time.perf_counter()) for _ in range(5))
print(2 * 2048**3 / best / 1e9)
PY
python3 - "$out" <<'PY'
import json, re, sys
out = sys.argv[1]
k = {}
for line in open(f"{out}/kindling-steps.txt"):
    m = re.match(r"\|\s*(.+?)\s*\|\s*([\d.]+)\s*\|\s*(\S+)\s*\|\s*(.*)", line)
    if m:
        k[m.group(1)] = (float(m.group(2)), m.group(4))
p = {r["bench"]: r for r in map(json.loads, open(f"{out}/pytorch-steps.jsonl"))}
peak = float(open(f"{out}/matmul-peak.txt").read())
print(f"peak: torch.mm 2048 on 2 threads, {peak:.0f} GFLOP/s (the % columns are of this)")
print("| shape (32 x 128) | Kindling tok/s | PyTorch tok/s | ratio | Kindling GFLOP/s (% peak) | PyTorch GFLOP/s (% peak) |")
print("|---|---|---|---|---|---|")
for name, key in [("tiny", "step tiny h128 L2"), ("mini", "step mini h256 L4"), ("small", "step small h512 L4")]:
    if key not in k or name not in p:
        continue
    ktok, note = k[key]
    kg = float(re.search(r"([\d.]+) GFLOP/s", note).group(1))
    ptok = p[name]["tokens_per_s"]
    pg = p[name]["gflop_per_step"] / p[name]["median_s"]
    print(f"| {name} | {ktok:.0f} | {ptok:.0f} | {ktok / ptok:.2f}x | {kg:.1f} ({100 * kg / peak:.0f}%) | {pg:.1f} ({100 * pg / peak:.0f}%) |")
sk = {}
for line in open(f"{out}/kindling-simclr.txt"):
    m = re.match(r"\|\s*(step simclr.*?)\s*\|\s*([\d.]+)\s*\|", line)
    if m:
        sk = float(m.group(2))
sp = json.load(open(f"{out}/pytorch-simclr.json"))["images_per_s"]
if sk:
    print(f"| SimCLR step (2 x 256 views) | {sk:.0f} img/s | {sp:.0f} img/s | {sk / sp:.2f}x | | |")
if "masking" in p:
    for key in ["masking, 1 thread", "masking, loader (rayon)"]:
        if key in k:
            print(f"| {key} | {k[key][0]:.0f} seq/s | HF collator {p['masking']['seq_per_s']:.0f} seq/s | {k[key][0] / p['masking']['seq_per_s']:.1f}x | | |")
PY
