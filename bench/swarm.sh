#!/usr/bin/env bash
# The shaped swarm lab: N hosts in network namespaces (HTB-shaped links both
# ways, addresses from 198.18.0.0/15, the root namespace untouched) pull one
# cold image at the same instant through Shoal, as a tuned BitTorrent swarm
# (libtorrent + opentracker, the origin the only seed) and as direct pulls
# from the origin, in the same run. See bench/lab.py for what is measured.
#
# Usage: sudo bench/swarm.sh [--nodes N] [--rate 100mbit] [--origin-rate RATE]
#                            [--layers L] [--layer-mib S] [--runs R] [--queue-ms MS]
#                            [--targets shoal,bittorrent,direct] [--chunk-size SIZE]
#                            [--shoald-arg ARG]... [--tracker-arg ARG]...
#                            [--manifest-first] [--out FILE] [--no-build]
# Installs what it needs (docker-registry, skopeo, iproute2, curl,
# python3-libtorrent, opentracker) with
# apt-get, builds the release binaries, and appends one JSON line per run to
# bench/results/lab-<date>.jsonl (or --out). Cleans up on exit and Ctrl-C;
# a lock keeps two runs apart.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [ "$(id -u)" -ne 0 ]; then
    echo "bench/swarm.sh: run as root (network namespaces): sudo bench/swarm.sh ..." >&2
    exit 2
fi

BUILD=1
ARGS=()
OUT="bench/results/lab-$(date -u +%F).jsonl"
while [ $# -gt 0 ]; do
    case "$1" in
        --no-build) BUILD=0; shift ;;
        --manifest-first) ARGS+=("$1"); shift ;;
        # Its value starts with "--": hand it to lab.py glued on.
        --shoald-arg) ARGS+=("--shoald-arg=$2"); shift 2 ;;
        --shoald-arg=*) ARGS+=("$1"); shift ;;
        --tracker-arg) ARGS+=("--tracker-arg=$2"); shift 2 ;;
        --tracker-arg=*) ARGS+=("$1"); shift ;;
        --out) OUT="$2"; shift 2 ;;
        --nodes|--rate|--origin-rate|--layers|--layer-mib|--runs|--targets|--chunk-size|--timeout|--queue-ms)
            ARGS+=("$1" "$2"); shift 2 ;;
        -h|--help) sed -n 2,16p "$0"; exit 0 ;;
        *) echo "bench/swarm.sh: unknown argument $1 (--help lists them)" >&2; exit 2 ;;
    esac
done

missing=()
for p in docker-registry:docker-registry skopeo:skopeo ip:iproute2 tc:iproute2 curl:curl python3:python3 opentracker:opentracker; do
    command -v "${p%%:*}" >/dev/null 2>&1 || [ -x "/usr/sbin/${p%%:*}" ] || missing+=("${p##*:}")
done
# The BitTorrent peers run on Debian's Python, where python3-libtorrent lives.
/usr/bin/python3 -c "import libtorrent" 2>/dev/null || missing+=(python3-libtorrent)
if [ "${#missing[@]}" -gt 0 ]; then
    echo "bench/swarm.sh: installing ${missing[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update
    apt-get install -y --no-install-recommends "${missing[@]}"
fi

if [ "$BUILD" = 1 ]; then
    cargo build --release -p shoal-daemon -p shoal-tracker --bins
fi
mkdir -p "$(dirname "$OUT")"
exec python3 bench/lab.py "${ARGS[@]}" --out "$OUT"
