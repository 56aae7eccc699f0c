#!/usr/bin/env bash
# Runs the tiny recipes (and, with --main, README's main job) with one binary and prints a
# sha256 of every exported file and the final eval metrics, so that two builds can be compared
# byte for byte: `scripts/same-outputs.sh BIN OUT_DIR > a.txt`, then the same with the other
# build, then `diff a.txt b.txt`. Used to check that a refactor leaves behaviour unchanged
# (issue 27, acceptance 3).
set -euo pipefail
bin=${1:?usage: same-outputs.sh KINDLING_BINARY OUT_DIR [--main]}
out=${2:?usage: same-outputs.sh KINDLING_BINARY OUT_DIR [--main]}
main=${3:-}
bin=$(realpath "$bin")
mkdir -p "$out"
runs=$(realpath "$out")/runs
run() {
  local name=$1; shift
  "$bin" "$@" --set runs_dir="\"$runs\"" >"$out/$name.log" 2>&1 || { echo "$name failed: see $out/$name.log" >&2; exit 1; }
}
run mlm pretrain recipes/tiny/bert-tiny-mlm.toml
run simclr pretrain recipes/tiny/simclr-tiny.toml
run simcse pretrain recipes/tiny/simcse-tiny.toml --set model.path="\"$runs/bert-tiny-mlm/export\""
run finetune finetune recipes/tiny/finetune-tiny.toml --set model.path="\"$runs/bert-tiny-mlm/export\""
[ "$main" = --main ] && run main pretrain recipes/bert-mini-mlm.toml
cd "$runs"
find . -path '*/export/*' -type f ! -name 'README.md' | sort | xargs sha256sum
# The last eval record of each run, its wall-clock time dropped.
for f in */metrics.jsonl; do
  echo "$f: $(grep '"eval' "$f" | tail -1 | sed 's/"elapsed_s":[0-9.e+-]*,//' | head -c 400)"
done
