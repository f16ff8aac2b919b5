#!/usr/bin/env bash
# Shoal's main job, end to end and offline: a local docker-registry as the
# origin, shoald as the node's mirror, and real containerd pulling an image
# through it twice (the second time with an empty content store). Prints
# what came from where. Installs what it needs (Debian); run as root.
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

echo "==> building shoald (release)"
cargo build --release -q -p shoal-daemon
SHOALD=$PWD/target/release/shoald

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
metric() { # NAME[{labels}]
  curl -fs "http://$OPS/metrics" | awk -v m="$1" '$1==m {print $2}' | head -n1
}

RPORT=$(port); SPORT=$(port); OPORT=$(port)
ORIGIN=127.0.0.1:$RPORT; MIRROR=127.0.0.1:$SPORT; OPS=127.0.0.1:$OPORT

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

echo "==> shoald on $MIRROR (metrics on $OPS)"
"$SHOALD" run --data-dir "$work/shoal" --registry-listen "$MIRROR" --ops-listen "$OPS" \
  --insecure-upstream "$ORIGIN" --default-upstream "$ORIGIN" >"$work/shoald.log" 2>&1 & pids+=($!)
wait_http "http://$OPS/healthz" shoald

# containerd reads <hosts-dir>/<registry>/hosts.toml: shoald first, the origin as fallback.
mkdir -p "$work/certs.d/$ORIGIN"
cat > "$work/certs.d/$ORIGIN/hosts.toml" <<TOML
server = "http://$ORIGIN"

[host."http://$MIRROR"]
  capabilities = ["pull", "resolve"]
TOML

start_containerd() { # NAME
  local d=$work/$1
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
  ctr --address "$work/$1/c.sock" -n demo images pull --hosts-dir "$work/certs.d" \
    --snapshotter native "$ORIGIN/demo/app:1.0" >"$work/$1/pull.log" 2>&1 \
    || { cat "$work/$1/pull.log" >&2; exit 1; }
  t1=$(date +%s.%N)
  python3 -c "print(f'{$t1-$t0:.2f}')"
}

image_mib=$((LAYERS * LAYER_MIB))
echo "==> pull 1: containerd #1 pulls $ORIGIN/demo/app:1.0 through shoald (cold)"
start_containerd node1
s1=$(pull node1)
o1=$(metric 'shoal_origin_bytes_total{kind="blob"}'); c1=$(metric shoal_client_bytes_served_total)
echo "==> pull 2: containerd #2, empty content store, pulls the same image"
start_containerd node2
s2=$(pull node2)
o2=$(metric 'shoal_origin_bytes_total{kind="blob"}'); c2=$(metric shoal_client_bytes_served_total)

mib() { python3 -c "print(f'{float(\"${1:-0}\")/1048576:.1f}')"; }
printf '\n%-32s %12s %12s %10s\n' "" "from origin" "to client" "seconds"
printf '%-32s %10s MiB %8s MiB %10s\n' "pull 1 (cold, through shoald)" "$(mib "$o1")" "$(mib "$c1")" "$s1"
printf '%-32s %10s MiB %8s MiB %10s\n' "pull 2 (cached in shoald)" "$(mib "$(python3 -c "print(${o2:-0}-${o1:-0})")")" \
  "$(mib "$(python3 -c "print(${c2:-0}-${c1:-0})")")" "$s2"
echo
echo "image: $image_mib MiB of layers; both containerds unpacked it (ctr -n demo images ls):"
ctr --address "$work/node2/c.sock" -n demo images ls -q
if [ "${o2:-0}" != "${o1:-0}" ]; then
  echo "unexpected: the second pull fetched from the origin again" >&2; exit 1
fi
echo "OK: the second pull cost the origin 0 blob bytes."
