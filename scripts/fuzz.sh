#!/usr/bin/env bash
# Runs Shoal's cargo-fuzz targets (fuzz/) for a number of minutes each.
#
#   bash scripts/fuzz.sh TARGET|all [MINUTES] [-- LIBFUZZER_ARGS...]
#
# Targets: wire, tracker_api, reference, route (docs/RELIABILITY.md). New
# inputs go to fuzz/corpus/TARGET/, crashes to fuzz/artifacts/TARGET/.
# Installs cargo-fuzz if it is missing. The stable toolchain accepts
# libFuzzer's compiler flags with RUSTC_BOOTSTRAP=1. Sanitizers are off:
# Shoal's crates forbid unsafe code, and without ASan the targets run
# several times faster.
set -euo pipefail
cd "$(dirname "$0")/.."

targets=(wire tracker_api reference route)
target=${1:-}
minutes=${2:-10}
shift $(( $# >= 2 ? 2 : $# ))
[[ ${1:-} == -- ]] && shift

if [[ -z $target ]]; then
    echo "usage: bash scripts/fuzz.sh TARGET|all [MINUTES] [-- LIBFUZZER_ARGS...]" >&2
    echo "targets: ${targets[*]}" >&2
    exit 2
fi
if [[ $target == all ]]; then
    run=("${targets[@]}")
else
    if [[ ! " ${targets[*]} " == *" $target "* ]]; then
        echo "unknown target '$target' (targets: ${targets[*]})" >&2
        exit 2
    fi
    run=("$target")
fi
if ! [[ $minutes =~ ^[0-9]+$ ]] || (( minutes < 1 )); then
    echo "MINUTES must be a whole number of minutes, at least 1 (got '$minutes')" >&2
    exit 2
fi

if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install --locked cargo-fuzz
fi
export RUSTC_BOOTSTRAP=1
for t in "${run[@]}"; do
    mkdir -p "fuzz/corpus/$t"
    echo "== fuzzing $t for $minutes min" >&2
    cargo fuzz run --fuzz-dir fuzz -s none "$t" "fuzz/corpus/$t" -- \
        -max_total_time=$((minutes * 60)) -print_final_stats=1 "$@"
done
