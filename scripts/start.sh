#!/usr/bin/env bash
# Set up (see setup.sh), then start JupyterLab with the linuxworker extension on loopback.
# Extra arguments go to `jupyter lab`, for example --port=8899.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh
mkdir -p notebooks
echo "Starting JupyterLab on 127.0.0.1; open the URL it prints below."
exec .venv/bin/jupyter lab --allow-root --no-browser --ip=127.0.0.1 \
  --ServerApp.root_dir="$PWD/notebooks" "$@"
