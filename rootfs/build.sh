#!/usr/bin/env bash
# Build the default job image from Debian's busybox-static, installing the package if needed.
#
# Usage: rootfs/build.sh [IMAGES_DIR] [build-default options, such as --replace]
# IMAGES_DIR defaults to /var/lib/jupyter-linuxworker/images. PYTHON selects the interpreter
# (default: the project's .venv). Installing the package needs root.
set -euo pipefail

script_dir="$(cd "$(dirname "$0")" && pwd)"
repo_root="$(dirname "$script_dir")"
images_dir="${1:-/var/lib/jupyter-linuxworker/images}"
if (($# > 0)); then
    shift
fi
python="${PYTHON:-$script_dir/../.venv/bin/python}"
busybox=/bin/busybox

if [[ ! -x "$python" ]] && ! command -v "$python" >/dev/null; then
    echo "error: python $python not found: create the venv in $repo_root/.venv or set PYTHON" >&2
    exit 1
fi

# Run the module from this checkout even when the package is not installed in $python.
export PYTHONPATH="$repo_root${PYTHONPATH:+:$PYTHONPATH}"

# Print why and return 1 unless $busybox is a statically linked executable.
check_busybox() {
    "$python" - "$busybox" <<'PYTHON'
import sys

from jupyter_linuxworker.sandbox.images import ImageError, check_static_busybox

try:
    check_static_busybox(sys.argv[1])
except ImageError as error:
    print(error, file=sys.stderr)
    sys.exit(1)
PYTHON
}

if ! check_busybox; then
    echo "installing Debian's busybox-static" >&2
    export DEBIAN_FRONTEND=noninteractive
    # The package lists may be missing or stale, so update them only if the install fails.
    if ! apt-get install -y busybox-static; then
        apt-get update
        apt-get install -y busybox-static
    fi
    check_busybox
fi

"$python" -m jupyter_linuxworker.sandbox.images --images-dir "$images_dir" \
    build-default --busybox "$busybox" "$@"
