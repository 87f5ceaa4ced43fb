#!/usr/bin/env bash
# Train from a TOML config (sd-scripts' --config_file layout), in the style of Akegarasu/lora-scripts' train_by_toml.sh:
# edit the settings below, then run `bash scripts/train_by_toml.sh` (from anywhere: it runs from the repository root).
#
# Every setting can also be given from the environment, e.g.
#   config_file=./configs/my_lora.toml multi_gpu=2 bash scripts/train_by_toml.sh
# SD_TRAINER_PRINT_ONLY=1 prints the command (one argument per line) and exits without training.
# PYTHON=/path/to/python picks the interpreter (default: python).
# scripts/train_by_toml.ps1 is the Windows twin of this file: same settings, same defaults, same flags.

config_file="${config_file:-./configs/lora.toml}" # training options as TOML (see configs/lora.toml)
sample_prompts="${sample_prompts:-}"            # prompt file for preview images (empty: as in the TOML / none)
script="${script:-train_network.py}"            # entry script: train_network.py, train_db.py,
                                                # train_textual_inversion.py, train_hypernetwork.py; SDXL:
                                                # sdxl_train_network.py, sdxl_train.py,
                                                # sdxl_train_textual_inversion.py
multi_gpu="${multi_gpu:-0}"                     # number of GPUs; 2 or more trains on that many (0/1: one device)
num_cpu_threads_per_process="${num_cpu_threads_per_process:-4}" # CPU threads per training process
extra_args="${extra_args:-}"                    # other trainer flags (they override the TOML), space separated

# ============= DO NOT MODIFY CONTENTS BELOW =========================================================================
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export TF_CPP_MIN_LOG_LEVEL=3

args=()        # trainer arguments
launch_args=() # accelerate launch arguments
add_arg() { if [[ -n "$2" ]]; then args+=("$1" "$2"); fi; }       # --flag value, left out when the value is empty
add_launch_arg() { if [[ -n "$2" ]]; then launch_args+=("$1=$2"); fi; }
add_launch_flag() { launch_args+=("$1"); }
add_extra() { if [[ -n "$1" ]]; then read -r -a _extra <<< "$1"; args+=("${_extra[@]}"); fi; }

# The flag table; scripts/train_by_toml.ps1 has the same lines in PowerShell spelling (checked by
# tests/test_wrapper_scripts.py).
# BEGIN ARGUMENTS
add_launch_arg "--num_cpu_threads_per_process" "$num_cpu_threads_per_process"
if [[ "$multi_gpu" -gt 1 ]]; then
  add_launch_flag "--multi_gpu"
  add_launch_arg "--num_processes" "$multi_gpu"
fi
add_arg "--config_file" "$config_file"
add_arg "--sample_prompts" "$sample_prompts"
add_extra "$extra_args"
# END ARGUMENTS

# launch.py is `accelerate launch` (same options) that keeps the trainer's one-line errors and exit code.
cmd=("${PYTHON:-python}" launch.py "${launch_args[@]}" "$script" "${args[@]}")

if [[ "${SD_TRAINER_PRINT_ONLY:-}" == "1" ]]; then
  printf '%s\n' "${cmd[@]}"
  exit 0
fi
echo "Running: ${cmd[*]}"
exec "${cmd[@]}"
