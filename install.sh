#!/usr/bin/env bash
# Installs simplepush into .venv (idempotent) and gives config.ini a token key: the file
# its token_key_file names (simplepush.key, mode 0600, ignored by git), made if missing.
#   ./install.sh         the server and its libraries
#   ./install.sh --dev   also the test and lint tools (pytest, pytest-tornado, hypothesis,
#                        websocket-client, selenium, ruff)
set -euo pipefail
cd "$(dirname "$0")"

extras=""
case "${1:-}" in
  "") ;;
  --dev) extras="[dev]" ;;
  *) echo "usage: $0 [--dev]" >&2; exit 2 ;;
esac

python="${PYTHON:-python3}"
if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "install.sh: simplepush needs Python 3.11 or newer ($python is $("$python" --version 2>&1))" >&2
  exit 1
fi
[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/python -m pip install --quiet --disable-pip-version-check --editable ".${extras}"

# A fresh key only where config.ini has none: rerunning keeps existing endpoints valid.
# The key goes into a file of its own, so config.ini stays as committed and holds no secret.
.venv/bin/simplepush genkey --fill --config config.ini
echo "install.sh: installed; run with: .venv/bin/simplepush --config config.ini"
