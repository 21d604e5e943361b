#!/usr/bin/env bash
# Install what jupyter-linuxworker needs on a Debian machine, as root: Debian packages, a venv in
# ./.venv with the project and its test tools, and the default image in the state folder.
set -euo pipefail
cd "$(dirname "$0")/.."

# gcc and libc6-dev build the static syscall probe that the seccomp tests run in a job.
# chromium is the browser that the widget tests drive with Playwright.
DEBIAN_PACKAGES=(busybox-static python3-venv iproute2 gcc libc6-dev chromium)
missing=()
for package in "${DEBIAN_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "Installing Debian packages: ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
fi

PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  echo "Creating the virtual environment in .venv"
  "$PYTHON" -m venv .venv
fi
# The install is editable, so only a change of pyproject.toml needs pip again.
stamp=.venv/.linuxworker-installed
wanted="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$wanted" ]; then
  echo "Installing jupyter-linuxworker and its test tools into .venv"
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet -e '.[test]'
  echo "$wanted" > "$stamp"
fi

images_dir="${JUPYTER_LINUXWORKER_STATE_DIR:-/var/lib/jupyter-linuxworker}/images"
if [ ! -f "$images_dir/default/image.json" ]; then
  echo "Building the default image in $images_dir"
  bash rootfs/build.sh "$images_dir"
fi
