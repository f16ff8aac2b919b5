#!/usr/bin/env bash
# Single-node benchmark of shoald against same-run baselines, all on loopback:
#   1. cache-hit blob GET throughput: shoald vs docker-registry vs iperf3 (one TCP stream)
#   2. manifest GET by digest (cache hit) with wrk at c=1 and c=64: shoald vs docker-registry,
#      shoald's `GET /v2/` at c=1 (the server loop's floor: no content work), and manifest
#      GET by tag at c=1 (shoald resolves tags at the origin every time)
#   3. cold pass-through of one large blob: fresh shoald vs a direct GET from the registry,
#      on loopback and again with the origin behind a proxy paced to --wan-mib MiB/s per
#      connection (default 100; 0 skips it), where the origin link is the bottleneck
# Prints a markdown table and appends one JSON line per measurement to --out.
#
# Usage: bash bench/single-node.sh [--out FILE] [--runs N] [--cold-runs N]
#                                  [--blob-mib N] [--wrk-seconds N] [--wrk-rounds N]
#                                  [--wan-mib N] [--no-build]
# Everything listens on 127.0.0.1 ports picked free at start; every loop is bounded;
# temp dirs and the processes this script started are removed on exit and on Ctrl-C.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
HELP="$ROOT/bench/helpers.py"

OUT=""
RUNS=5
COLD_RUNS=3
BLOB_MIB=256
WRK_SECONDS=10
WRK_ROUNDS=3
WAN_MIB=100
IPERF_SECONDS=5
BUILD=1
while [ $# -gt 0 ]; do
    case "$1" in
        --out) OUT="$2"; shift 2 ;;
        --runs) RUNS="$2"; shift 2 ;;
        --cold-runs) COLD_RUNS="$2"; shift 2 ;;
        --blob-mib) BLOB_MIB="$2"; shift 2 ;;
        --wrk-seconds) WRK_SECONDS="$2"; shift 2 ;;
        --wrk-rounds) WRK_ROUNDS="$2"; shift 2 ;;
        --wan-mib) WAN_MIB="$2"; shift 2 ;;
        --no-build) BUILD=0; shift ;;
        -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"; exit 0 ;;
        *) echo "single-node.sh: unknown argument $1 (try --help)" >&2; exit 2 ;;
    esac
done
DATE="$(date -u +%Y-%m-%dT%H:%M:%SZ)"
RUN_ID="$(date -u +%Y%m%dT%H%M%SZ)-$$"
[ -n "$OUT" ] || OUT="$ROOT/bench/results/single-node-$(date -u +%Y-%m-%d).jsonl"
mkdir -p "$(dirname "$OUT")"

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "FAILED: $*"; exit 1; }

# ---------------------------------------------------------------- tools
declare -A PKG_OF=(
    [docker-registry]=docker-registry [wrk]=wrk [iperf3]=iperf3 [curl]=curl
    [python3]=python3 [ss]=iproute2 [sha256sum]=coreutils
)
missing=()
for prog in "${!PKG_OF[@]}"; do
    command -v "$prog" >/dev/null 2>&1 || missing+=("${PKG_OF[$prog]}")
done
if [ "${#missing[@]}" -gt 0 ]; then
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    log "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -q >/dev/null
    $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
    for prog in "${!PKG_OF[@]}"; do
        command -v "$prog" >/dev/null 2>&1 || die "$prog still missing after apt-get install"
    done
fi

SHOALD="$ROOT/target/release/shoald"
if [ "$BUILD" = 1 ]; then
    log "cargo build --release -p shoal-daemon"
    (cd "$ROOT" && cargo build --release -q -p shoal-daemon) \
        || die "the release build failed (--no-build benchmarks the existing target/release/shoald)"
fi
[ -x "$SHOALD" ] || die "$SHOALD missing (build with cargo build --release -p shoal-daemon)"

# ---------------------------------------------------------------- cleanup
WORK="$(mktemp -d "${TMPDIR:-/tmp}/shoal-bench.XXXXXX")"
PIDS=()
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    for pid in "${PIDS[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    rm -rf "$WORK"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

forget_pid() {
    local p=$1 keep=() x
    for x in "${PIDS[@]}"; do [ "$x" = "$p" ] || keep+=("$x"); done
    PIDS=("${keep[@]}")
}

stop_pid() { # pid: TERM, wait up to 15 s, then KILL
    local pid=$1
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 150); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    forget_pid "$pid"
}

wait_http() { # url seconds pid
    local url=$1 secs=$2 pid=$3 i
    for i in $(seq $((secs * 10))); do
        kill -0 "$pid" 2>/dev/null || return 1
        curl -fs -o /dev/null --max-time 1 "$url" && return 0
        sleep 0.1
    done
    return 1
}

wait_listen() { # port seconds pid
    local port=$1 secs=$2 pid=$3 i
    for i in $(seq $((secs * 20))); do
        kill -0 "$pid" 2>/dev/null || return 1
        [ -n "$(ss -Hltn "sport = :$port" 2>/dev/null)" ] && return 0
        sleep 0.05
    done
    return 1
}

CLK_TCK="$(getconf CLK_TCK)"
cpu_s() { # pid -> user+system CPU seconds so far
    awk -v hz="$CLK_TCK" '{ sub(/^.*\) /, ""); printf "%.3f\n", ($12 + $13) / hz }' "/proc/$1/stat" 2>/dev/null || echo 0
}
fsub() { python3 -c "import sys; print(f'{float(sys.argv[1]) - float(sys.argv[2]):.3f}')" "$1" "$2"; }
rec() { python3 "$HELP" record "$OUT" "run_id=$RUN_ID" "$@"; }
median() { python3 "$HELP" median "$@"; }
jlist() { local IFS=,; echo "[$*]"; }

# ---------------------------------------------------------------- origin registry
REG_PORT="$(python3 "$HELP" free-ports 1)"
mkdir -p "$WORK/registry/storage"
cat > "$WORK/registry/config.yml" <<EOF
version: 0.1
log:
  level: warn
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: $WORK/registry/storage
  maintenance:
    uploadpurging:
      enabled: false
  redirect:
    disable: true
http:
  addr: 127.0.0.1:$REG_PORT
  secret: bench-$RUN_ID
EOF
docker-registry serve "$WORK/registry/config.yml" >"$WORK/registry/log" 2>&1 &
REG_PID=$!
PIDS+=("$REG_PID")
REG="http://127.0.0.1:$REG_PORT"
wait_http "$REG/v2/" 20 "$REG_PID" || { cat "$WORK/registry/log" >&2; die "docker-registry did not start"; }
log "docker-registry on $REG"

REPO=bench/big
push_blob() { # file digest
    local file=$1 digest=$2 loc sep
    loc="$(curl -fsS -X POST -D - -o /dev/null "$REG/v2/$REPO/blobs/uploads/" \
        | tr -d '\r' | awk 'tolower($1) == "location:" { print $2 }')"
    [ -n "$loc" ] || die "upload POST gave no Location"
    case "$loc" in /*) loc="$REG$loc" ;; esac
    case "$loc" in *\?*) sep='&' ;; *) sep='?' ;; esac
    curl -fsS -o /dev/null -X PUT -H 'Expect:' -H 'Content-Type: application/octet-stream' \
        -T "$file" "$loc${sep}digest=$digest" || die "upload PUT of $digest failed"
}

log "making a ${BLOB_MIB} MiB incompressible blob"
head -c "$((BLOB_MIB * 1024 * 1024))" /dev/urandom > "$WORK/blob"
BLOB_BYTES="$(stat -c %s "$WORK/blob")"
BLOB_DIGEST="sha256:$(sha256sum "$WORK/blob" | cut -d' ' -f1)"
push_blob "$WORK/blob" "$BLOB_DIGEST"
rm -f "$WORK/blob"   # the registry has its own copy
CONFIG_DIGEST="$(python3 "$HELP" manifest "$WORK" "$BLOB_DIGEST" "$BLOB_BYTES")"
push_blob "$WORK/config.json" "$CONFIG_DIGEST"
MT=application/vnd.oci.image.manifest.v1+json
curl -fsS -o /dev/null -X PUT -H "Content-Type: $MT" --data-binary "@$WORK/manifest.json" \
    "$REG/v2/$REPO/manifests/v1" || die "manifest PUT failed"
MANIFEST_DIGEST="sha256:$(sha256sum "$WORK/manifest.json" | cut -d' ' -f1)"
log "pushed $REPO: blob $BLOB_DIGEST ($BLOB_BYTES bytes), manifest $MANIFEST_DIGEST (tag v1)"

# ---------------------------------------------------------------- shoald
SHOALD_PID=""
start_shoald() { # data dir [origin port]
    local dir=$1 up=${2:-$REG_PORT} sp op
    local ports; ports="$(python3 "$HELP" free-ports 2)"; read -r sp op <<<"$ports"
    mkdir -p "$dir"
    "$SHOALD" run --data-dir "$dir" --registry-listen "127.0.0.1:$sp" --ops-listen "127.0.0.1:$op" \
        --insecure-upstream "127.0.0.1:$up" --default-upstream "127.0.0.1:$up" \
        >"$dir.log" 2>&1 &
    SHOALD_PID=$!
    PIDS+=("$SHOALD_PID")
    SHOAL="http://127.0.0.1:$sp"
    OPS="http://127.0.0.1:$op"
    wait_http "$OPS/healthz" 30 "$SHOALD_PID" || { cat "$dir.log" >&2; die "shoald did not become healthy"; }
}
origin_blob_bytes() {
    curl -fsS "$OPS/metrics" > "$WORK/metrics.txt"
    python3 "$HELP" metric "$WORK/metrics.txt" shoal_origin_bytes_total 'kind="blob"'
}

rec test=meta "date=$DATE" "host=$(hostname)" "cpus=$(nproc)" "kernel=$(uname -r)" \
    "blob_bytes=$BLOB_BYTES" "blob_mib=$BLOB_MIB" "shoald_version=$("$SHOALD" --version | awk '{print $2}')" \
    "runs=$RUNS" "cold_runs=$COLD_RUNS" "wrk_seconds=$WRK_SECONDS" "wrk_rounds=$WRK_ROUNDS"

get_blob() { # url -> "speed_bytes_per_s time_s"; checks the size
    local out speed size t
    out="$(curl -fsS -o /dev/null --max-time 300 -w '%{speed_download} %{size_download} %{time_total}' "$1")" \
        || die "GET $1 failed"
    read -r speed size t <<<"$out"
    [ "$size" = "$BLOB_BYTES" ] || die "GET $1 returned $size bytes, want $BLOB_BYTES"
    echo "$speed $t"
}

# ---------------------------------------------------------------- 1. cache-hit blob GET
start_shoald "$WORK/shoald-warm"
log "shoald on $SHOAL (ops $OPS)"
log "warming shoald's cache with one GET of the blob"
get_blob "$SHOAL/v2/$REPO/blobs/$BLOB_DIGEST" >/dev/null
iperf_once() { # sets G (GB/s); runs in this shell so that cleanup knows the server's pid
    local port pid
    port="$(python3 "$HELP" free-ports 1)"
    iperf3 -s -1 -B 127.0.0.1 -p "$port" >"$WORK/iperf-server.log" 2>&1 &
    pid=$!
    PIDS+=("$pid")
    wait_listen "$port" 10 "$pid" || die "iperf3 server did not listen"
    iperf3 -c 127.0.0.1 -p "$port" -t "$IPERF_SECONDS" -J >"$WORK/iperf.json" 2>&1 || true
    G="$(python3 "$HELP" iperf-gbps "$WORK/iperf.json")" || { cat "$WORK/iperf.json" >&2; die "iperf3 failed"; }
    stop_pid "$pid"
}
blob_hit() { # target: sets G (GB/s), C (server CPU s), T (transfer s)
    local target=$1 url pid c0 c1 out speed
    case "$target" in
        shoald) url="$SHOAL/v2/$REPO/blobs/$BLOB_DIGEST"; pid=$SHOALD_PID ;;
        registry) url="$REG/v2/$REPO/blobs/$BLOB_DIGEST"; pid=$REG_PID ;;
    esac
    c0="$(cpu_s "$pid")"
    out="$(get_blob "$url")"
    c1="$(cpu_s "$pid")"
    read -r speed T <<<"$out"
    G="$(python3 -c "import sys; print(f'{float(sys.argv[1]) / 1e9:.4f}')" "$speed")"
    C="$(fsub "$c1" "$c0")"
}
fadd() { python3 -c "import sys; print(f'{float(sys.argv[1]) + float(sys.argv[2]):.3f}')" "$1" "$2"; }
S_RUNS=(); R_RUNS=(); I_RUNS=(); S_CPU=0; R_CPU=0; S_T=0; R_T=0
log "cache-hit blob GET: $RUNS interleaved rounds of shoald / docker-registry / iperf3"
for i in $(seq "$RUNS"); do
    # Rotate the order so that no target always runs first or last in a round.
    case $((i % 3)) in
        1) order="shoald registry iperf3" ;;
        2) order="registry iperf3 shoald" ;;
        0) order="iperf3 shoald registry" ;;
    esac
    for target in $order; do
        case "$target" in
            iperf3) iperf_once; I_RUNS+=("$G") ;;
            shoald) blob_hit shoald; S_RUNS+=("$G"); S_CPU="$(fadd "$S_CPU" "$C")"; S_T="$(fadd "$S_T" "$T")" ;;
            registry) blob_hit registry; R_RUNS+=("$G"); R_CPU="$(fadd "$R_CPU" "$C")"; R_T="$(fadd "$R_T" "$T")" ;;
        esac
        log "  round $i $target: $G GB/s"
    done
done
# server CPU seconds per second of transfer (1.0 = one core busy).
rec test=blob_cache_hit target=shoald "n=$RUNS" "runs_gbps=$(jlist "${S_RUNS[@]}")" \
    "median_gbps=$(median "${S_RUNS[@]}")" "server_cpu_cores=$(python3 -c "print(round($S_CPU / $S_T, 3))")"
rec test=blob_cache_hit target=registry "n=$RUNS" "runs_gbps=$(jlist "${R_RUNS[@]}")" \
    "median_gbps=$(median "${R_RUNS[@]}")" "server_cpu_cores=$(python3 -c "print(round($R_CPU / $R_T, 3))")"
rec test=blob_cache_hit target=iperf3 "n=$RUNS" "runs_gbps=$(jlist "${I_RUNS[@]}")" \
    "median_gbps=$(median "${I_RUNS[@]}")" "seconds_per_run=$IPERF_SECONDS"

# ---------------------------------------------------------------- 2. manifests with wrk
ACCEPT="Accept: $MT, application/vnd.oci.image.index.v1+json, application/vnd.docker.distribution.manifest.v2+json, application/vnd.docker.distribution.manifest.list.v2+json"
# Warm (and check) both: shoald caches the manifest and the origin's confirmation.
for base in "$SHOAL" "$REG"; do
    got="$(curl -fsS -H "$ACCEPT" "$base/v2/$REPO/manifests/$MANIFEST_DIGEST" | sha256sum | cut -d' ' -f1)"
    [ "sha256:$got" = "$MANIFEST_DIGEST" ] || die "manifest from $base has the wrong digest"
    curl -fsS -o /dev/null -H "$ACCEPT" "$base/v2/$REPO/manifests/v1" || die "manifest by tag from $base failed"
done
WRK_RUNS="$WORK/wrk-runs.jsonl"
run_wrk() { # test target url conns threads: one wrk run, appended to $WRK_RUNS
    local test=$1 target=$2 url=$3 c=$4 t=$5 pid c0 c1 parsed
    case "$target" in shoald) pid=$SHOALD_PID ;; registry) pid=$REG_PID ;; esac
    c0="$(cpu_s "$pid")"
    wrk -c"$c" -t"$t" -d"${WRK_SECONDS}s" --latency -H "$ACCEPT" "$url" >"$WORK/wrk.txt" 2>&1 \
        || { cat "$WORK/wrk.txt" >&2; die "wrk failed"; }
    c1="$(cpu_s "$pid")"
    parsed="$(python3 "$HELP" wrk "$WORK/wrk.txt")"
    log "  $test $target c=$c: $parsed"
    python3 - "$WRK_RUNS" "$test" "$target" "$c" "$t" "$WRK_SECONDS" "$(fsub "$c1" "$c0")" "$parsed" <<'PY'
import json, sys
out, test, target, c, t, secs, cpu, parsed = sys.argv[1:]
d = {"test": test, "target": target, "connections": int(c), "threads": int(t),
     "seconds": int(secs), "server_cpu_cores": round(float(cpu) / int(secs), 3)}
d.update(json.loads(parsed))
open(out, "a").write(json.dumps(d) + "\n")
PY
}
# Every configuration runs WRK_ROUNDS times; each round visits all of them in a
# rotated order, so a burst of noise from elsewhere lands on one run of several
# configurations rather than on every run of one. The medians are reported.
# The floor (shoald's `GET /v2/`: the same server loop with no content work)
# shows what this machine's scheduling noise alone does to p99 in this run.
CONFIGS=(
    "manifest_digest_c1 shoald $SHOAL/v2/$REPO/manifests/$MANIFEST_DIGEST 1 1"
    "manifest_digest_c1 registry $REG/v2/$REPO/manifests/$MANIFEST_DIGEST 1 1"
    "floor_base_c1 shoald $SHOAL/v2/ 1 1"
    "manifest_digest_c64 shoald $SHOAL/v2/$REPO/manifests/$MANIFEST_DIGEST 64 2"
    "manifest_digest_c64 registry $REG/v2/$REPO/manifests/$MANIFEST_DIGEST 64 2"
    "manifest_tag_c1 shoald $SHOAL/v2/$REPO/manifests/v1 1 1"
    "manifest_tag_c1 registry $REG/v2/$REPO/manifests/v1 1 1"
)
log "manifests with wrk: ${#CONFIGS[@]} configurations x $WRK_ROUNDS rounds x ${WRK_SECONDS}s"
n=${#CONFIGS[@]}
for r in $(seq "$WRK_ROUNDS"); do
    for k in $(seq 0 $((n - 1))); do
        # Round r starts at a different configuration and walks them in the
        # opposite direction on even rounds.
        if [ $((r % 2)) = 1 ]; then j=$(((k + (r - 1) * 3) % n)); else j=$(((n - 1 - k + (r - 1) * 3) % n)); fi
        # shellcheck disable=SC2086
        run_wrk ${CONFIGS[$j]}
    done
done
python3 "$HELP" aggregate-wrk "$WRK_RUNS" "$OUT" "$RUN_ID"
stop_pid "$SHOALD_PID"
rm -rf "$WORK/shoald-warm"

# ---------------------------------------------------------------- 3. cold pass-through
log "cold pass-through: $COLD_RUNS rounds of fresh shoald vs direct"
CS=(); CD=(); OB=()
for i in $(seq "$COLD_RUNS"); do
    dir="$WORK/shoald-cold-$i"
    start_shoald "$dir"
    if [ $((i % 2)) = 1 ]; then order="shoald direct"; else order="direct shoald"; fi
    for target in $order; do
        case "$target" in
            shoald)
                out="$(get_blob "$SHOAL/v2/$REPO/blobs/$BLOB_DIGEST")"; read -r _ t <<<"$out"
                ob="$(origin_blob_bytes)"
                CS+=("$t"); OB+=("$ob")
                log "  round $i shoald (cold): ${t}s, origin bytes $ob" ;;
            direct)
                out="$(get_blob "$REG/v2/$REPO/blobs/$BLOB_DIGEST")"; read -r _ t <<<"$out"
                CD+=("$t")
                log "  round $i direct: ${t}s" ;;
        esac
    done
    stop_pid "$SHOALD_PID"
    rm -rf "$dir" "$dir.log"
done
rec test=cold_blob target=shoald "n=$COLD_RUNS" "runs_s=$(jlist "${CS[@]}")" "median_s=$(median "${CS[@]}")" \
    "origin_bytes=$(jlist "${OB[@]}")"
rec test=cold_blob target=registry "n=$COLD_RUNS" "runs_s=$(jlist "${CD[@]}")" "median_s=$(median "${CD[@]}")"

# ---------------------------------------------------------------- 3b. cold, WAN-like origin
# On loopback the origin is as fast as the local CPU, so the cold path's own work
# (verify, store, serve) is all that is measured. Behind a paced proxy the origin
# link is the bottleneck, as it is for a real registry: both shoald and the
# direct GET go through the same proxy.
if [ "$WAN_MIB" != 0 ]; then
    PROXY_PORT="$(python3 "$HELP" free-ports 1)"
    python3 "$HELP" throttle-proxy "$PROXY_PORT" "$REG_PORT" "$((WAN_MIB * 1024 * 1024))" 600 \
        >"$WORK/proxy.log" 2>&1 &
    PROXY_PID=$!
    PIDS+=("$PROXY_PID")
    wait_listen "$PROXY_PORT" 10 "$PROXY_PID" || die "throttle proxy did not listen"
    PROXY="http://127.0.0.1:$PROXY_PORT"
    log "cold pass-through, origin paced to $WAN_MIB MiB/s: $COLD_RUNS rounds"
    WS=(); WD=(); WOB=()
    for i in $(seq "$COLD_RUNS"); do
        dir="$WORK/shoald-wan-$i"
        start_shoald "$dir" "$PROXY_PORT"
        if [ $((i % 2)) = 1 ]; then order="shoald direct"; else order="direct shoald"; fi
        for target in $order; do
            case "$target" in
                shoald)
                    out="$(get_blob "$SHOAL/v2/$REPO/blobs/$BLOB_DIGEST")"; read -r _ t <<<"$out"
                    ob="$(origin_blob_bytes)"
                    WS+=("$t"); WOB+=("$ob")
                    log "  round $i shoald (cold, paced origin): ${t}s, origin bytes $ob" ;;
                direct)
                    out="$(get_blob "$PROXY/v2/$REPO/blobs/$BLOB_DIGEST")"; read -r _ t <<<"$out"
                    WD+=("$t")
                    log "  round $i direct (paced origin): ${t}s" ;;
            esac
        done
        stop_pid "$SHOALD_PID"
        rm -rf "$dir" "$dir.log"
    done
    stop_pid "$PROXY_PID"
    rec test=cold_blob_wan target=shoald "n=$COLD_RUNS" "origin_rate_mib_s=$WAN_MIB" "runs_s=$(jlist "${WS[@]}")" \
        "median_s=$(median "${WS[@]}")" "origin_bytes=$(jlist "${WOB[@]}")"
    rec test=cold_blob_wan target=registry "n=$COLD_RUNS" "origin_rate_mib_s=$WAN_MIB" "runs_s=$(jlist "${WD[@]}")" \
        "median_s=$(median "${WD[@]}")"
fi

# ---------------------------------------------------------------- report
echo
python3 "$HELP" table "$OUT" "$RUN_ID"
echo
log "results appended to $OUT (run_id $RUN_ID)"
