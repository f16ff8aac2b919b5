#!/usr/bin/env bash
# Tracker throughput, against opentracker in the same run, on loopback:
#   1. shoal-tracker under target/release/tracker-bench: keep-alive mutual
#      TLS (HTTP/2, one node certificate per connection), each request one
#      announce or one lookup as a transfer sends them (see tracker-bench's
#      doc comment);
#   2. opentracker (Debian) under wrk: plain-HTTP BitTorrent announces over
#      keep-alive HTTP/1.1, a random peer id and one of --blobs whitelisted
#      info hashes per request.
# Both run on the same 2 cores as their load generator. Prints both rates,
# the ratio, and the tracker's CPU time per request, and appends one JSON
# line per round to --out.
#
# Usage: bash bench/tracker.sh [--rounds N] [--secs S] [--connections C]
#                              [--depth D] [--wrk-connections C] [--out FILE]
#                              [--no-build]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

ROUNDS=3
SECS=10
CONNS=32
DEPTH=8
WRK_CONNS=64
BUILD=1
OUT="$ROOT/bench/results/tracker-$(date -u +%F).jsonl"
while [ $# -gt 0 ]; do
    case "$1" in
        --rounds) ROUNDS="$2"; shift 2 ;;
        --secs) SECS="$2"; shift 2 ;;
        --connections) CONNS="$2"; shift 2 ;;
        --depth) DEPTH="$2"; shift 2 ;;
        --wrk-connections) WRK_CONNS="$2"; shift 2 ;;
        --out) OUT="$2"; shift 2 ;;
        --no-build) BUILD=0; shift ;;
        -h|--help) sed -n 2,16p "$0"; exit 0 ;;
        *) echo "bench/tracker.sh: unknown argument $1 (--help lists them)" >&2; exit 2 ;;
    esac
done

SUDO=""
[ "$(id -u)" -ne 0 ] && SUDO="sudo"
missing=()
for p in opentracker:opentracker wrk:wrk; do
    command -v "${p%%:*}" >/dev/null 2>&1 || [ -x "/usr/sbin/${p%%:*}" ] || missing+=("${p##*:}")
done
if [ "${#missing[@]}" -gt 0 ]; then
    echo "bench/tracker.sh: installing ${missing[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update
    $SUDO apt-get install -y --no-install-recommends "${missing[@]}"
fi
OPENTRACKER="$(command -v opentracker || echo /usr/sbin/opentracker)"

cd "$ROOT"
if [ "$BUILD" = 1 ]; then
    cargo build --release -p shoal-tracker --bins
fi
mkdir -p "$(dirname "$OUT")"

WORK="$(mktemp -d /tmp/shoal-tracker-bench.XXXXXX)"
OT_PID=""
cleanup() {
    [ -n "$OT_PID" ] && kill "$OT_PID" 2>/dev/null && wait "$OT_PID" 2>/dev/null
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# opentracker drops privileges before it reads its whitelist.
chmod 755 "$WORK"
BLOBS=8
python3 - "$WORK" "$BLOBS" <<'EOF'
import hashlib, sys
work, n = sys.argv[1], int(sys.argv[2])
hashes = [hashlib.sha1(b"shoal-bench-%d" % i).digest() for i in range(n)]
with open(f"{work}/allow", "w") as f:
    f.writelines(h.hex() + "\n" for h in hashes)
enc = lambda b: "".join("%%%02X" % c for c in b)
with open(f"{work}/announce.lua", "w") as f:
    f.write("local hashes = {%s}\n" % ", ".join('"%s"' % enc(h) for h in hashes))
    f.write('''
math.randomseed(7)
request = function()
    local peer = string.format("-SB0001-%012d", math.random(0, 999999999999))
    local h = hashes[math.random(1, #hashes)]
    local path = "/announce?info_hash=" .. h .. "&peer_id=" .. peer ..
        "&port=" .. math.random(1024, 65535) .. "&uploaded=0&downloaded=0&left=1048576&compact=1&numwant=32"
    return wrk.format("GET", path)
end
''')
EOF
chmod 644 "$WORK/allow" "$WORK/announce.lua"
PORT="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"

for round in $(seq 1 "$ROUNDS"); do
    echo "== round $round/$ROUNDS"
    SHOAL_JSON="$(target/release/tracker-bench --connections "$CONNS" --depth "$DEPTH" \
        --secs "$SECS" --blobs "$BLOBS" | tee /dev/stderr | tail -1)"

    "$OPENTRACKER" -i 127.0.0.1 -p "$PORT" -P "$PORT" -w "$WORK/allow" >"$WORK/opentracker.log" 2>&1 &
    OT_PID=$!
    for _ in $(seq 1 100); do
        curl -sf "http://127.0.0.1:$PORT/stats" >/dev/null 2>&1 && break
        sleep 0.1
    done
    OT_CPU0="$(awk '{print $14+$15}' /proc/$OT_PID/stat)"
    WRK_OUT="$(wrk -t2 -c"$WRK_CONNS" -d"${SECS}s" --latency -s "$WORK/announce.lua" "http://127.0.0.1:$PORT")"
    OT_CPU1="$(awk '{print $14+$15}' /proc/$OT_PID/stat)"
    kill "$OT_PID"; wait "$OT_PID" 2>/dev/null || true; OT_PID=""
    echo "$WRK_OUT" | grep -E "Requests/sec|Non-2xx|Socket errors|50%|99%" | sed 's/^/  opentracker: /'

    python3 - "$SHOAL_JSON" "$WRK_OUT" "$OT_CPU0" "$OT_CPU1" "$SECS" "$WRK_CONNS" "$round" "$OUT" <<'EOF'
import json, re, sys, datetime
shoal = json.loads(sys.argv[1])
wrk, cpu0, cpu1, secs, conns, rnd, out = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5]), int(sys.argv[6]), int(sys.argv[7]), sys.argv[8]
rps = float(re.search(r"Requests/sec:\s+([\d.]+)", wrk).group(1))
bad = re.search(r"Non-2xx or 3xx responses: (\d+)", wrk)
if bad:
    sys.exit(f"opentracker answered {bad.group(1)} requests with an error status")
ot_cpu = (cpu1 - cpu0) / 100.0
reqs = rps * secs
line = {
    "bench": "tracker-vs-opentracker", "round": rnd,
    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    "shoal": shoal,
    "opentracker": {"req_per_s": rps, "wrk_connections": conns,
                    "cpu_s": ot_cpu, "cpu_us_per_req": ot_cpu * 1e6 / reqs if reqs else None},
    "ratio_req_per_s": shoal["req_per_s"] / rps,
}
print(f"  shoal-tracker {shoal['req_per_s']:.0f} req/s ({shoal['tracker_cpu_us_per_req']:.1f} us CPU/req, mTLS + HTTP/2 + JSON)"
      f" vs opentracker {rps:.0f} req/s ({line['opentracker']['cpu_us_per_req']:.1f} us CPU/req, plain HTTP/1.1):"
      f" ratio {line['ratio_req_per_s']:.2f}")
with open(out, "a") as f:
    f.write(json.dumps(line) + "\n")
EOF
done
echo "results appended to $OUT"
