#!/usr/bin/env bash
# Open TensorBoard on the training logs (Akegarasu/lora-scripts' tensorboard.ps1, for bash):
# run `bash scripts/tensorboard.sh` and browse to http://localhost:6006.
# Settings can also be given from the environment, e.g. `logdir=./output/demo/logs port=6007 bash scripts/tensorboard.sh`.
# SD_TRAINER_PRINT_ONLY=1 prints the command (one argument per line) and exits.
# scripts/tensorboard.ps1 is the Windows twin of this file: same settings, same defaults, same flags.

logdir="${logdir:-./logs}"                      # the logging_dir of the runs to show
port="${port:-6006}"                            # port to serve on

# ============= DO NOT MODIFY CONTENTS BELOW =========================================================================
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

args=()
add_arg() { if [[ -n "$2" ]]; then args+=("$1" "$2"); fi; }

# The flag table; scripts/tensorboard.ps1 has the same lines in PowerShell spelling (checked by
# tests/test_wrapper_scripts.py).
# BEGIN ARGUMENTS
add_arg "--logdir" "$logdir"
add_arg "--port" "$port"
# END ARGUMENTS

if command -v tensorboard > /dev/null 2>&1; then
  cmd=(tensorboard "${args[@]}")
else
  cmd=("${PYTHON:-python}" -m tensorboard.main "${args[@]}")
fi

if [[ "${SD_TRAINER_PRINT_ONLY:-}" == "1" ]]; then
  printf '%s\n' "${cmd[@]}"
  exit 0
fi
echo "Running: ${cmd[*]}"
exec "${cmd[@]}"
