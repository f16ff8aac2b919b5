#!/usr/bin/env bash
# Builds Shoal's container image (Containerfile) with podman: compiles the
# binaries (release), stages them with the shared libraries they link and
# the CA bundle into a build context, and builds the image from scratch.
#
#   scripts/image.sh [--tag NAME] [--binaries DIR]
#
#   --tag NAME       image name (default: shoal:VERSION, also tagged shoal:latest)
#   --binaries DIR   use shoald, shoal-tracker and shoalctl from DIR instead of
#                    building them (e.g. target/debug)
#
# PODMAN may name the podman command with options
# (e.g. PODMAN="podman --root /tmp/x --storage-driver vfs").
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

tags=()
bins=""
while [ $# -gt 0 ]; do
    case "$1" in
        --tag) tags+=("$2"); shift 2 ;;
        --binaries) bins="$2"; shift 2 ;;
        *) echo "scripts/image.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done
PODMAN=${PODMAN:-podman}
if ! command -v "${PODMAN%% *}" >/dev/null 2>&1; then
    echo "scripts/image.sh: podman is missing: apt-get install -y podman" >&2
    exit 1
fi
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
if [ "${#tags[@]}" -eq 0 ]; then
    tags=("shoal:$version" "shoal:latest")
fi
if [ -z "$bins" ]; then
    cargo build --release --locked -p shoal-daemon -p shoal-tracker --bins
    bins="${CARGO_TARGET_DIR:-target}/release"
fi

ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT
root="$ctx/rootfs"
mkdir -p "$root/usr/local/bin" "$root/etc/ssl/certs" "$root/var/lib/shoal" "$root/tmp"
chmod 1777 "$root/tmp"
for b in shoald shoal-tracker shoalctl; do
    if [ ! -x "$bins/$b" ]; then
        echo "scripts/image.sh: $bins/$b is missing" >&2
        exit 1
    fi
    cp "$bins/$b" "$root/usr/local/bin/"
    # Debug info stays out of the image (it is most of a debug build).
    if command -v strip >/dev/null 2>&1; then
        strip --strip-debug "$root/usr/local/bin/$b"
    fi
done
# The shared libraries the binaries link (glibc, libgcc), at their paths.
for lib in $(ldd "$root"/usr/local/bin/* | grep -o '/[^ ]*\.so[^ ]*' | sort -u); do
    mkdir -p "$root$(dirname "$lib")"
    cp -L "$lib" "$root$lib"
done
if [ -f /etc/ssl/certs/ca-certificates.crt ]; then
    cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/"
fi
printf 'root:x:0:0:root:/root:/usr/local/bin/shoalctl\nnobody:x:65534:65534:nobody:/nonexistent:/usr/local/bin/shoalctl\n' > "$root/etc/passwd"
printf 'root:x:0:\nnogroup:x:65534:\n' > "$root/etc/group"
printf 'hosts: files dns\n' > "$root/etc/nsswitch.conf"
cp Containerfile "$ctx/"
tag_args=()
for t in "${tags[@]}"; do
    tag_args+=(-t "$t")
done
# shellcheck disable=SC2086
$PODMAN build -q "${tag_args[@]}" -f "$ctx/Containerfile" "$ctx"
echo "built ${tags[*]}"
