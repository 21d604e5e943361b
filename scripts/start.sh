#!/usr/bin/env bash
# Set up (see setup.sh), then start JupyterLab with the linuxworker extension on loopback,
# opening the quickstart notebook. JUPYTER_PORT sets the port (default 8888); extra arguments
# go to `jupyter lab`.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh
mkdir -p notebooks
port="${JUPYTER_PORT:-8888}"
token="$(.venv/bin/python -c 'import secrets; print(secrets.token_hex(24))')"
echo
echo "JupyterLab with jupyter-linuxworker starts on 127.0.0.1. Open the quickstart notebook at:"
echo "    http://127.0.0.1:${port}/lab/tree/quickstart.ipynb?token=${token}"
echo
exec .venv/bin/jupyter lab --allow-root --no-browser --ip=127.0.0.1 --port="$port" \
  --ServerApp.port_retries=0 --IdentityProvider.token="$token" \
  --ServerApp.root_dir="$PWD/notebooks" "$@"
