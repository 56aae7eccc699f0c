#!/usr/bin/env bash
# Peak memory of training from a streamed image folder against the folder's size: makes 20k and
# 200k 28x28 PNGs (benches/images/make_pngs.py, under $BENCH_DIR, default /tmp/kindling-pngs),
# then trains the tiny SimCLR recipe on each (`stream = true`, 60 steps of 64, no probes) under
# /usr/bin/time -v and prints the wall time and peak RSS of both, of the 200k folder loaded
# into memory (`stream = false`) and of the 200k folder packed (`kindling pack-images`, then
# `shards`) beside them.
#
#   KINDLING_PYTHON=path/to/python-with-pillow-and-numpy bash benches/images/run_stream_bench.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
PY="${KINDLING_PYTHON:-python3}"
DIR="${BENCH_DIR:-/tmp/kindling-pngs}"
cargo build --release --quiet
for run in 20000:true 200000:true 200000:false 200000:shards; do
  n="${run%%:*}"; stream="${run##*:}"
  if [ ! -d "$DIR/$n" ]; then
    echo "== making $n PNGs in $DIR/$n"
    "$PY" benches/images/make_pngs.py "$n" "$DIR/$n"
  fi
  rm -rf "$DIR/runs-$n-$stream"
  source="folder = { path = \"$DIR/$n\", size = [28, 28], color = \"gray\", stream = $stream }"
  if [ "$stream" = shards ]; then
    if [ ! -d "$DIR/packed-$n" ]; then
      /usr/bin/time -f "packing $n PNGs: %e s, peak RSS %M kB" \
        ./target/release/kindling pack-images "$DIR/$n" --out "$DIR/packed-$n" > /dev/null
    fi
    source="shards = { dir = \"$DIR/packed-$n\", size = [28, 28], color = \"gray\" }"
  fi
  /usr/bin/time -v ./target/release/kindling pretrain recipes/tiny/simclr-tiny.toml \
    --set "data.train={ $source }" \
    --set data.max_train_images=0 --set "runs_dir=\"$DIR/runs-$n-$stream\"" \
    --set train.steps=60 --set train.eval_every=0 --set train.save_every=0 \
    --set probe.enabled=false --set eval.knn_k=0 \
    > "$DIR/log-$n-$stream.txt" 2>&1
  echo "$n images, stream = $stream: $(grep -E 'Elapsed|Maximum resident' "$DIR/log-$n-$stream.txt" | sed 's/^\s*//' | tr '\n' ';')"
done
