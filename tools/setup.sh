#!/usr/bin/env bash
# casfs set-up on a Debian/Ubuntu machine, as root (or as a user who already has the
# system packages). Installs the system packages and a virtualenv in .venv, then:
#   bash tools/setup.sh mount [MOUNTPOINT]   mount the default volume (default /mnt/casfs)
#   bash tools/setup.sh test [PYTEST ARGS]   run the type check and the whole test suite
set -euo pipefail
cd "$(dirname "$0")/.."

install() {
    if [ "$(id -u)" = 0 ]; then
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -q
        apt-get install -y -q --no-install-recommends fuse3 libfuse3-dev pkg-config gcc \
            mariadb-server python3-venv python3-dev e2fsprogs git >/dev/null
    fi
    if [ ! -x .venv/bin/python ]; then
        python3 -m venv .venv
    fi
    .venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'
}

cmd="${1:-}"
shift || true
case "$cmd" in
    mount)
        install
        mp="${1:-/mnt/casfs}"
        mkdir -p "$mp"
        .venv/bin/casfs mount "$mp"
        echo "casfs is mounted at $mp; unmount with: $(pwd)/.venv/bin/casfs umount $mp"
        ;;
    test)
        install
        .venv/bin/python -m mypy
        exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
        ;;
    *)
        echo "usage: bash tools/setup.sh mount [MOUNTPOINT] | test [PYTEST ARGS]" >&2
        exit 2
        ;;
esac
