#!/usr/bin/env bash
# Creates (once) a Python virtual environment with pinned packages and
# prints its interpreter's path on the last line of stdout.
#
#   tests/support/python-venv.sh VENV_DIR REQUIREMENTS_FILE
#
# Idempotent: the venv is rebuilt only when the requirements file changed
# (its hash is kept in VENV_DIR/.requirements.sha256). Concurrent callers
# wait for each other (flock). Needs python3 with pip; where the venv module
# is missing (Debian's python3 without python3-venv) it is installed with
# apt-get when running as root.
set -euo pipefail
[ $# -eq 2 ] || { echo "usage: $0 VENV_DIR REQUIREMENTS_FILE" >&2; exit 64; }
VENV="$(realpath -m "$1")"
REQUIREMENTS="$(realpath "$2")"
PYTHON="${PYTHON:-python3}"

mkdir -p "$(dirname "$VENV")"
exec 9>"$VENV.lock"
flock 9

want="$(sha256sum "$REQUIREMENTS" | cut -d' ' -f1)"
if [ -x "$VENV/bin/python" ] && [ "$(cat "$VENV/.requirements.sha256" 2>/dev/null)" = "$want" ]; then
  echo "$VENV/bin/python"
  exit 0
fi

command -v "$PYTHON" >/dev/null || { echo "$0: $PYTHON is not installed" >&2; exit 69; }
rm -rf "$VENV"
if ! "$PYTHON" -m venv "$VENV" >&2; then
  rm -rf "$VENV"
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "$0: the venv module is missing; installing python3-venv" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get -o DPkg::Lock::Timeout=300 install -y -q --no-install-recommends python3-venv >&2 \
      || { apt-get -o DPkg::Lock::Timeout=300 update -q >&2 \
           && apt-get -o DPkg::Lock::Timeout=300 install -y -q --no-install-recommends python3-venv >&2; }
    "$PYTHON" -m venv "$VENV" >&2
  else
    echo "$0: '$PYTHON -m venv' failed and python3-venv cannot be installed here (needs root and apt-get)" >&2
    exit 69
  fi
fi
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-input -r "$REQUIREMENTS" >&2
echo "$want" > "$VENV/.requirements.sha256"
echo "$VENV/bin/python"
