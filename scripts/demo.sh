#!/usr/bin/env bash
# Shoal's main job, end to end and offline: a local docker-registry as the
# origin, a two-node Shoal cluster on loopback (a cluster CA from
# `shoald cluster-init`, a `shoal-tracker`, and one `shoald` per node), and a
# real containerd on each node pulling an image through its node's shoald.
# Node 1 pulls cold (its chunks come from the origin); node 2 pulls the same
# image and gets it from node 1 over QUIC. Prints what came from where.
# Installs what it needs (Debian); run as root.
#
#   bash scripts/demo.sh            # 3 layers of 16 MiB
#   LAYERS=5 LAYER_MIB=64 bash scripts/demo.sh
set -euo pipefail
cd "$(dirname "$0")/.."
LAYERS=${LAYERS:-3}
LAYER_MIB=${LAYER_MIB:-16}

need=()
for p in docker-registry:docker-registry containerd:containerd ctr:containerd skopeo:skopeo curl:curl; do
  command -v "${p%%:*}" >/dev/null || need+=("${p##*:}")
done
if [ ${#need[@]} -gt 0 ]; then
  echo "==> installing ${need[*]}"
  SUDO=; [ "$(id -u)" -eq 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi
[ "$(id -u)" -eq 0 ] || { echo "containerd needs root: run as root (or with sudo)" >&2; exit 1; }

echo "==> building shoald and shoal-tracker (release)"
cargo build --release -q -p shoal-daemon -p shoal-tracker
SHOALD=$PWD/target/release/shoald
TRACKER=$PWD/target/release/shoal-tracker

work=$(mktemp -d /tmp/shoal-demo.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT INT TERM

port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_http() { # URL what
  for _ in $(seq 1 100); do curl -fs -o /dev/null "$1" && return 0; sleep 0.1; done
  echo "$2 did not come up; logs in $work" >&2; exit 1
}
metric() { # OPS NAME[{labels}]
  curl -fs "http://$1/metrics" | awk -v m="$2" '$1==m {print $2}' | head -n1
}

RPORT=$(port)
ORIGIN=127.0.0.1:$RPORT

echo "==> origin: docker-registry on $ORIGIN"
mkdir -p "$work/registry"
cat > "$work/registry.yml" <<YML
version: 0.1
storage:
  filesystem:
    rootdirectory: $work/registry
http:
  addr: $ORIGIN
log:
  level: warn
YML
docker-registry serve "$work/registry.yml" >"$work/registry.log" 2>&1 & pids+=($!)
wait_http "http://$ORIGIN/v2/" docker-registry

echo "==> generating an image ($LAYERS layers x $LAYER_MIB MiB, incompressible) and pushing it with skopeo"
python3 scripts/make-image.py "$work/image" demo "$LAYERS" "$LAYER_MIB" >/dev/null
skopeo copy -q --dest-tls-verify=false "oci:$work/image:demo" "docker://$ORIGIN/demo/app:1.0"

echo "==> cluster: a CA (shoald cluster-init) and shoal-tracker"
"$SHOALD" cluster-init "$work/cluster" >/dev/null
TPORT=$(port); TOPS=$(port)
"$TRACKER" --listen "127.0.0.1:$TPORT" --cluster-dir "$work/cluster" --name 127.0.0.1 \
  --ops-listen "127.0.0.1:$TOPS" >"$work/tracker.log" 2>&1 & pids+=($!)
wait_http "http://127.0.0.1:$TOPS/healthz" shoal-tracker

declare -A MIRROR OPS
for n in 1 2; do
  MIRROR[$n]=127.0.0.1:$(port); OPS[$n]=127.0.0.1:$(port)
  echo "==> node $n: shoald on ${MIRROR[$n]} (metrics on ${OPS[$n]})"
  "$SHOALD" run --data-dir "$work/node$n/shoal" --registry-listen "${MIRROR[$n]}" --ops-listen "${OPS[$n]}" \
    --insecure-upstream "$ORIGIN" --default-upstream "$ORIGIN" \
    --cluster-dir "$work/cluster" --node-id "node-$n" --peer-listen "127.0.0.1:$(port)" \
    --tracker "https://127.0.0.1:$TPORT" >"$work/shoald-$n.log" 2>&1 & pids+=($!)
  wait_http "http://${OPS[$n]}/healthz" "shoald on node $n"
  # containerd reads <hosts-dir>/<registry>/hosts.toml: the node's shoald
  # first, the origin as fallback.
  mkdir -p "$work/node$n/certs.d/$ORIGIN"
  cat > "$work/node$n/certs.d/$ORIGIN/hosts.toml" <<TOML
server = "http://$ORIGIN"

[host."http://${MIRROR[$n]}"]
  capabilities = ["pull", "resolve"]
TOML
done

start_containerd() { # NAME
  local d=$work/$1/containerd
  mkdir -p "$d"
  cat > "$d/config.toml" <<TOML
version = 2
root = "$d/root"
state = "$d/state"
disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.overlayfs",
  "io.containerd.internal.v1.tracing", "io.containerd.tracing.processor.v1.otlp"]
[grpc]
  address = "$d/c.sock"
[ttrpc]
  address = "$d/c.sock.ttrpc"
[debug]
  address = "$d/d.sock"
[metrics]
  address = ""
TOML
  containerd --config "$d/config.toml" >"$d/log" 2>&1 & pids+=($!)
  for _ in $(seq 1 100); do [ -S "$d/c.sock" ] && return 0; sleep 0.1; done
  echo "containerd did not start; see $d/log" >&2; exit 1
}

pull() { # NAME
  local t0 t1
  t0=$(date +%s.%N)
  ctr --address "$work/$1/containerd/c.sock" -n demo images pull --hosts-dir "$work/$1/certs.d" \
    --snapshotter native "$ORIGIN/demo/app:1.0" >"$work/$1/pull.log" 2>&1 \
    || { cat "$work/$1/pull.log" >&2; exit 1; }
  t1=$(date +%s.%N)
  python3 -c "print(f'{$t1-$t0:.2f}')"
}

image_mib=$((LAYERS * LAYER_MIB))
echo "==> node 1: containerd pulls $ORIGIN/demo/app:1.0 through its shoald (cold)"
start_containerd node1
s1=$(pull node1)
echo "==> node 2: containerd pulls the same image through its own shoald"
start_containerd node2
s2=$(pull node2)

mib() { python3 -c "print(f'{float(\"${1:-0}\")/1048576:.1f}')"; }
printf '\n%-34s %14s %14s %14s %8s\n' "" "from origin" "from peers" "to containerd" "seconds"
for n in 1 2; do
  o=$(metric "${OPS[$n]}" 'shoal_origin_bytes_total{kind="blob"}')
  p=$(metric "${OPS[$n]}" shoal_peer_bytes_received_total)
  c=$(metric "${OPS[$n]}" shoal_client_bytes_served_total)
  secs=$([ "$n" = 1 ] && echo "$s1" || echo "$s2")
  printf '%-34s %10s MiB %10s MiB %10s MiB %8s\n' "node $n ($([ "$n" = 1 ] && echo cold || echo 'after node 1'))" \
    "$(mib "$o")" "$(mib "$p")" "$(mib "$c")" "$secs"
done
echo
echo "image: $image_mib MiB of layers; node 2's containerd has it (ctr -n demo images ls):"
ctr --address "$work/node2/containerd/c.sock" -n demo images ls -q
o2=$(metric "${OPS[2]}" 'shoal_origin_bytes_total{kind="blob"}')
if [ "${o2:-0}" != "0" ]; then
  echo "unexpected: node 2 fetched blob bytes from the origin" >&2; exit 1
fi
echo "OK: node 2 got every layer from node 1 (verified chunk by chunk); the origin sent it 0 blob bytes."
