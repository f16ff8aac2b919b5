#!/usr/bin/env bash
# Chunk size by measurement: swarm-bench (N members + shoal-tracker + docker-registry on
# loopback) with the origin and every member's peer upload capped at --rate, once per chunk
# size, interleaved over --rounds rounds so drift on this shared box hits every size alike.
# Each run also measures N direct pulls at the same origin rate; the bound is F/rate.
# Appends swarm-bench's JSON line per run to --out and prints a summary per chunk size.
#
# Usage: bash bench/chunk-size.sh [--nodes N] [--layers L] [--layer-mib S] [--rate RATE]
#                                 [--sizes "256KiB 1MiB 4MiB"] [--rounds R] [--out FILE]
#                                 [--no-build]
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
NODES=8
LAYERS=3
LAYER_MIB=16
RATE=100mbit
SIZES="256KiB 1MiB 4MiB"
ROUNDS=2
OUT="$ROOT/bench/results/chunk-size-$(date -u +%F).jsonl"
BUILD=1
while [ $# -gt 0 ]; do
    case "$1" in
        --nodes) NODES="$2"; shift 2 ;;
        --layers) LAYERS="$2"; shift 2 ;;
        --layer-mib) LAYER_MIB="$2"; shift 2 ;;
        --rate) RATE="$2"; shift 2 ;;
        --sizes) SIZES="$2"; shift 2 ;;
        --rounds) ROUNDS="$2"; shift 2 ;;
        --out) OUT="$2"; shift 2 ;;
        --no-build) BUILD=0; shift ;;
        *) echo "bench/chunk-size.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done

cd "$ROOT"
if [ "$BUILD" = 1 ]; then
    cargo build --release --workspace --bins
fi
export SHOALD_BIN="$ROOT/target/release/shoald"
mkdir -p "$(dirname "$OUT")"
TMP="$(mktemp)"
trap 'rm -f "$TMP"' EXIT

for round in $(seq 1 "$ROUNDS"); do
    for size in $SIZES; do
        echo "== round $round, chunk size $size" >&2
        line="$(timeout 600 "$ROOT/target/release/swarm-bench" "$NODES" "$LAYERS" "$LAYER_MIB" \
            --rate "$RATE" --chunk-size "$size" | tail -1)"
        echo "$line" | tee -a "$OUT" >&2
        echo "$size $line" >> "$TMP"
    done
done

python3 - "$TMP" <<'PY'
import json, statistics, sys
runs = {}
for line in open(sys.argv[1]):
    size, js = line.split(" ", 1)
    runs.setdefault(size, []).append(json.loads(js))
print("| chunk size | runs | shoal / bound (median) | direct / bound | origin egress × image | peer bytes × image |")
print("|---|---|---|---|---|---|")
for size, rs in runs.items():
    med = lambda k: statistics.median(r[k] for r in rs)
    print(f"| {size} | {len(rs)} | {statistics.median(r['shoal_s'] / r['bound_s'] for r in rs):.2f} "
          f"| {statistics.median(r['direct_s'] / r['bound_s'] for r in rs):.2f} "
          f"| {med('shoal_egress_ratio'):.3f} | {med('peer_bytes_ratio'):.2f} |")
PY
