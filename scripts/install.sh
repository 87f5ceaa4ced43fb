#!/usr/bin/env bash
# Install sd-trainer into the current Python environment.
# torch is installed first, pinned, so that pip does not resolve an unpinned torch to a multi-GB CUDA build.
# Override the pin for a GPU machine, e.g.:
#   SD_TRAINER_TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128" bash scripts/install.sh
# Usage: bash scripts/install.sh [test|deepspeed]
#   "test" also installs what the test suite needs (DeepSpeed included); "deepspeed" adds DeepSpeed alone.
# DeepSpeed builds against the torch installed here (--no-build-isolation): an isolated build would fetch its own,
# unpinned torch (a multi-GB CUDA build on a CPU machine). Its CUDA kernels are not pre-built; it JIT-compiles what
# it needs (a C++ compiler and ninja).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-$(command -v python || command -v python3)}"
TORCH_SPEC="${SD_TRAINER_TORCH:-torch==2.13.0}"
# shellcheck disable=SC2086  # the spec may carry pip options on purpose
"$PY" -m pip install --quiet --disable-pip-version-check $TORCH_SPEC
extra=""
[ "${1:-}" = "test" ] && extra="[test]"
"$PY" -m pip install --quiet --disable-pip-version-check -e ".${extra}"
case "${1:-}" in
  test|deepspeed)
    "$PY" -m pip install --quiet --disable-pip-version-check wheel ninja
    "$PY" -m pip install --quiet --disable-pip-version-check --no-build-isolation "${SD_TRAINER_DEEPSPEED:-deepspeed==0.19.8}" ;;
esac
