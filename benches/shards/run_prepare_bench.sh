#!/usr/bin/env bash
# Issue 9's measurements: prepare a large corpus into token shards and train from them.
#   benches/shards/run_prepare_bench.sh [SIZE_MB=1000] [SAMPLE_MB=50]
# 1. makes SIZE_MB of text from the shipped novels (sentences shuffled) in $WORK/corpus,
# 2. `kindling prepare` on it (peak RSS from /usr/bin/time), then HF tokenizers' Python
#    encode_batch on the first SAMPLE_MB of the same text (needs a Python with `tokenizers`:
#    $KINDLING_PYTHON, else python3),
# 3. 200 bert-mini training steps streaming from those shards (peak RSS, steps/s),
# 4. the same 200 steps on the shipped corpus, in memory and from shards, back to back.
# Not run in CI (about 20 minutes on 2 cores, and 2 GB of disk).
set -euo pipefail
cd "$(dirname "$0")/../.."
SIZE_MB="${1:-1000}"
SAMPLE_MB="${2:-50}"
STEPS="${STEPS:-200}"
WORK="${KINDLING_BENCH_DIR:-target/shards-bench}"
PY="${KINDLING_PYTHON:-python3}"
mkdir -p "$WORK"
cargo build --release --quiet
K=target/release/kindling
# The recipe's own WordPiece (vocab 8192, trained on the shipped novels; from the tokenizer
# cache after the first run): a tokenizer is trained on a corpus in memory, so the large corpus
# is tokenised with one trained beforehand, as a user of a 10 GB corpus would.
TOK="$WORK/runs/tokenizer/tokenizer.json"
[ -f "$TOK" ] || $K pretrain recipes/bert-mini-mlm.toml --set "runs_dir=\"$WORK/runs\"" --set name=tokenizer \
  --set train.steps=1 --set train.eval_every=0 --overwrite > /dev/null 2>&1
rss() { awk '/Maximum resident/ {printf "%.0f MB", $6/1024}' "$1"; }

[ -d "$WORK/corpus" ] || python3 benches/shards/make_corpus.py "$WORK/corpus" "$SIZE_MB"
common=(--set "data.tokenizer={ path = \"$TOK\" }" --set "runs_dir=\"$WORK/runs\"")
big=(--set "data.corpus=[\"$WORK/corpus/*.txt\"]" --set "data.prepare={ dir = \"$WORK/prepared-big\" }")

echo "== kindling prepare, $SIZE_MB MB"
[ "${FRESH:-1}" = 1 ] && rm -rf "$WORK/prepared-big"   # FRESH=0 reuses it (and measures no throughput)
/usr/bin/time -v $K prepare recipes/bert-mini-mlm.toml "${common[@]}" "${big[@]}" 2> "$WORK/prepare.time" | tee "$WORK/prepare.json"
grep -E "^prepare:" "$WORK/prepare.time" || true
echo "peak RSS of prepare: $(rss "$WORK/prepare.time")"

echo "== HF tokenizers (Python), first $SAMPLE_MB MB"
"$PY" benches/shards/hf_tokenize.py "$TOK" "$WORK/corpus" "$SAMPLE_MB"

steps=(--set train.steps=$STEPS --set train.max_eval_batches=8 --set train.eval_every=0 --set train.save_every=0 --set train.log_every=50 --overwrite)
echo "== 200 steps streaming from the $SIZE_MB MB shards"
/usr/bin/time -v $K pretrain recipes/bert-mini-mlm.toml "${common[@]}" "${big[@]}" "${steps[@]}" --set name=big-shards 2> "$WORK/train-big.time" > "$WORK/train-big.json"
grep -E "^prepare:|^data:" "$WORK/train-big.time" || true
echo "peak RSS of training: $(rss "$WORK/train-big.time")"

echo "== 200 steps on the shipped corpus: in memory, then from shards"
for mode in memory shards; do
  extra=()
  [ "$mode" = shards ] && extra=(--set "data.prepare={ dir = \"$WORK/prepared-shipped\" }")
  /usr/bin/time -v $K pretrain recipes/bert-mini-mlm.toml "${common[@]}" "${extra[@]}" "${steps[@]}" --set name=shipped-$mode 2> "$WORK/train-$mode.time" > /dev/null
  python3 - "$WORK/runs/shipped-$mode/metrics.jsonl" "$mode" "$(rss "$WORK/train-$mode.time")" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if '"train"' in l]
steps = [r["step_s"] for r in rows[10:] or rows]
print(f"{sys.argv[2]:>7}: median step {statistics.median(steps):.3f} s ({1/statistics.median(steps):.2f} steps/s) over steps 11 on, peak RSS {sys.argv[3]}")
PY
done
