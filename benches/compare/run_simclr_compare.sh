#!/usr/bin/env bash
# SimCLR on Fashion-MNIST, Kindling vs the same config in PyTorch, back to back on this machine
# (not run in CI). Needs benches/compare/.venv with torch + numpy (see README.md here).
#
#   bash benches/compare/run_simclr_compare.sh          # step throughput only (~2 min)
#   FULL=1 bash benches/compare/run_simclr_compare.sh   # also both whole runs + probes (~20 min)
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-benches/compare/.venv/bin/python}
cargo build --release --bench vision >/dev/null 2>&1 || cargo bench --bench vision --no-run
# The shared host's speed swings by up to 3x within minutes, so the two sides alternate,
# ROUNDS times, and each round's ratio compares runs a minute apart.
echo "== step throughput (views made beforehand; 2 threads; ${ROUNDS:=3} alternating rounds)"
echo "| round | Kindling images/s | PyTorch images/s | ratio |"
echo "|---|---|---|---|"
for r in $(seq 1 "$ROUNDS"); do
  k=$(cargo bench --bench vision -- simclr 2>/dev/null | grep -E "^\| step simclr" | awk -F'|' '{gsub(/ /,"",$3); print $3}')
  t=$($PY benches/compare/simclr_reference.py --out /tmp/simclr-torch-bench --bench 8 --threads 2 \
      | tail -1 | $PY -c 'import json,sys; print(round(json.load(sys.stdin)["images_per_s"], 1))')
  echo "| $r | $k | $t | $($PY -c "print(f'{$k / $t:.2f}x')") |"
done
if [ "${FULL:-0}" = 1 ]; then
  echo "== whole runs: recipes/simclr-fashion-mnist.toml vs simclr_reference.py"
  cargo run --release -- pretrain recipes/simclr-fashion-mnist.toml --set name=simclr-compare --overwrite 2>&1 | tail -6
  $PY benches/compare/simclr_reference.py --out runs/simclr-compare/torch | tail -1
  $PY benches/compare/simclr_curves.py runs/simclr-compare
fi
