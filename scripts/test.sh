#!/usr/bin/env bash
# The project's one test command: installs the real components the black-box tests use,
# builds the daemon, then runs every crate's unit tests and the integration tests.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi

# Debian package -> a program it provides.
declare -A NEEDED=(
    [docker-registry]=docker-registry
    [containerd]=containerd
    [skopeo]=skopeo
    [redis-server]=redis-server
    [podman]=podman
    [runc]=runc
    [chromium]=chromium
)
missing=()
for pkg in "${!NEEDED[@]}"; do
    prog="${NEEDED[$pkg]}"
    if ! command -v "$prog" >/dev/null 2>&1 && [ ! -x "/usr/bin/$prog" ] && [ ! -x "/usr/sbin/$prog" ]; then
        missing+=("$pkg")
    fi
done
# ctr comes with containerd.
if ! command -v ctr >/dev/null 2>&1 && [[ ! " ${missing[*]} " =~ " containerd " ]]; then
    missing+=(containerd)
fi
# The tracker's status page is checked in headless chromium: give it a font.
if [[ " ${missing[*]} " =~ " chromium " ]]; then
    missing+=(fonts-dejavu-core)
fi
if [ "${#missing[@]}" -gt 0 ]; then
    echo "scripts/test.sh: installing ${missing[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    if ! $SUDO apt-get update; then
        echo "scripts/test.sh: apt-get update failed" >&2
        exit 1
    fi
    if ! $SUDO apt-get install -y --no-install-recommends "${missing[@]}"; then
        echo "scripts/test.sh: apt-get install ${missing[*]} failed" >&2
        exit 1
    fi
    for prog in docker-registry containerd ctr skopeo redis-server podman runc chromium; do
        if ! command -v "$prog" >/dev/null 2>&1 && [ ! -x "/usr/bin/$prog" ] && [ ! -x "/usr/sbin/$prog" ]; then
            echo "scripts/test.sh: $prog is still missing after the install" >&2
            exit 1
        fi
    done
fi

# The Kubernetes examples are rendered with kubectl (its built-in kustomize)
# and checked against the Kubernetes schemas with kubernetes-validate (PyPI).
if ! command -v kubectl >/dev/null 2>&1; then
    echo "scripts/test.sh: installing kubernetes-client (kubectl)" >&2
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update
    $SUDO apt-get install -y --no-install-recommends kubernetes-client
fi
if ! command -v kubernetes-validate >/dev/null 2>&1 && [ ! -x "$HOME/.local/bin/kubernetes-validate" ]; then
    echo "scripts/test.sh: installing kubernetes-validate (pip)" >&2
    if ! python3 -m pip --version >/dev/null 2>&1; then
        export DEBIAN_FRONTEND=noninteractive
        $SUDO apt-get update
        $SUDO apt-get install -y --no-install-recommends python3-pip
    fi
    # A Debian system Python refuses plain pip installs (PEP 668).
    python3 -m pip install --user kubernetes-validate \
        || python3 -m pip install --user --break-system-packages kubernetes-validate
fi

# The integration tests spawn target/debug/shoald.
cargo build --workspace --bins
cargo test --workspace --no-fail-fast
