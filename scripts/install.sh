#!/usr/bin/env bash
# Install sd-trainer into the current Python environment.
# torch is installed first, pinned, so that pip does not resolve an unpinned torch to a multi-GB CUDA build.
# Override the pin for a GPU machine, e.g.:
#   SD_TRAINER_TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128" bash scripts/install.sh
# Usage: bash scripts/install.sh [test]    ("test" also installs what the test suite needs)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-$(command -v python || command -v python3)}"
TORCH_SPEC="${SD_TRAINER_TORCH:-torch==2.13.0}"
# shellcheck disable=SC2086  # the spec may carry pip options on purpose
"$PY" -m pip install --quiet --disable-pip-version-check $TORCH_SPEC
extra=""
[ "${1:-}" = "test" ] && extra="[test]"
"$PY" -m pip install --quiet --disable-pip-version-check -e ".${extra}"
