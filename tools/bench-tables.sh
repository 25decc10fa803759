#!/usr/bin/env bash
# The README's "The benchmark" and "Fine-tuning" measurements for one vlsm binary, on the
# full-size random rd64-refined that tools/bench.sh sets up (WORK/model). Prints the lines
# the tables are made from (the bench summary line, the train cache and throughput lines).
#   bash tools/bench-tables.sh BIN [WORK]      e.g. target/release/vlsm /var/tmp/vlsm-bench
set -euo pipefail
cd "$(dirname "$0")/.."
bin=$1
work=${2:-/var/tmp/vlsm-bench}
model=$work/model
out=$work/tables-$(basename "$(dirname "$bin")")
rm -rf "$out" && mkdir -p "$out"
echo "# $bin ($(date -u +%FT%TZ), $(nproc) cores)"

bench() { # name, extra options
  local name=$1
  shift
  /usr/bin/time -f "%e wall s, %U+%S CPU s, peak %M KiB" "$bin" bench --data ../shared/data/samples \
    --datasets kvasir --weights "$model" --out "$out/$name" "$@" 2>"$out/$name.log" >/dev/null
  echo "bench $name: $(grep '^bench:' "$out/$name.log" | tail -n1) | $(tail -n1 "$out/$name.log")"
}
bench encode-once
bench no-fsync --no-fsync
bench no-encode-once --no-encode-once
cmp -s "$out/encode-once/results.csv" "$out/no-encode-once/results.csv" \
  && echo "results.csv identical with and without --no-encode-once"

"$bin" synthetic "$out/synthetic" --train 32 --val 8 --test 8 --size 352 >/dev/null
train() { # name, extra options
  local name=$1
  shift
  /usr/bin/time -f "%e wall s, %U+%S CPU s, peak %M KiB" "$bin" train --weights "$model" \
    --data "$out/synthetic" --datasets ellipses --prompt p1 --batch-size 8 --out "$out/run-$name" \
    "$@" 2>"$out/train-$name.log" >/dev/null
  echo "train $name: $(grep -h -E '^(cached|full fine-tuning)' "$out/train-$name.log") | $(grep '^trained' "$out/train-$name.log") | val Dice $(grep -o 'val Dice [0-9.]*' "$out/train-$name.log" | awk '{ print $3 }' | paste -sd/) | $(tail -n1 "$out/train-$name.log")"
}
train cache --epochs 3
train no-cache --epochs 2 --no-cache
train f16 --epochs 3 --precision f16
train bf16 --epochs 3 --precision bf16
train full --epochs 1 --full
