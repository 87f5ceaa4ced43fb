#!/usr/bin/env bash
# LoRA / LoCon / LoHa / LoKr training for Stable Diffusion 1.x/2.x (and SDXL: sdxl=1), in the style of
# Akegarasu/lora-scripts' train.sh:
# edit the settings below, then run `bash scripts/train.sh` (from anywhere: it runs from the repository root).
#
# Every setting can also be given from the environment without editing this file, e.g.
#   pretrained_model=./sd-models/v1-5.safetensors train_data_dir=./train/mychar algo=locon bash scripts/train.sh
# SD_TRAINER_PRINT_ONLY=1 prints the command (one argument per line) and exits without training.
# PYTHON=/path/to/python picks the interpreter (default: python).
# scripts/train.ps1 is the Windows twin of this file: same settings, same defaults, same flags.
# An empty value leaves its flag out (the trainer's own default applies).

# ---- Model ---------------------------------------------------------------------------------------------------------
pretrained_model="${pretrained_model:-./sd-models/model.safetensors}" # base model: .safetensors/.ckpt file, diffusers folder, or a Hub id
sdxl="${sdxl:-0}"                               # 1: an SDXL model, trained by sdxl_train_network.py (keep model_type=sd1)
model_type="${model_type:-sd1}"                 # sd1 (SD 1.x) or sd2 (SD 2.x; clip_skip is then not passed)
parameterization="${parameterization:-0}"       # 1: v-parameterization (SD 2.x 768-v models), with model_type=sd2
train_data_dir="${train_data_dir:-./train/data}" # training images: folders named <repeats>_<class tokens>, captions in .txt
reg_data_dir="${reg_data_dir:-}"                # regularisation images, same layout (empty: none)

# ---- Network -------------------------------------------------------------------------------------------------------
algo="${algo:-lora}"                            # lora | locon (LoRA + conv layers) | loha | lokr | oft (network_alpha: its constraint, e.g. 1e-3) | dylora
network_module="${network_module:-}"            # empty: chosen from algo (networks.lora/loha/lokr/oft/dylora); or e.g. lycoris.kohya
network_weights="${network_weights:-}"          # continue from these adapter weights (empty: start fresh)
network_dim="${network_dim:-32}"                # rank, usually 4..128
network_alpha="${network_alpha:-32}"            # alpha, usually network_dim or half of it (smaller needs a higher lr)
conv_dim="${conv_dim:-4}"                       # conv rank for locon/loha/lokr (not used by plain lora)
conv_alpha="${conv_alpha:-4}"                   # conv alpha for locon/loha/lokr
dropout="${dropout:-0}"                         # adapter dropout, 0 = off (passed as --network_args dropout=...)

# ---- Training ------------------------------------------------------------------------------------------------------
resolution="${resolution:-512,512}"             # width,height (a single number for a square)
batch_size="${batch_size:-1}"                   # images per step
max_train_epoches="${max_train_epoches:-10}"    # epochs to train
max_train_steps="${max_train_steps:-}"          # when set: train this many steps instead of max_train_epoches
save_every_n_epochs="${save_every_n_epochs:-2}" # also save every N epochs
train_unet_only="${train_unet_only:-0}"         # 1: train only the U-Net part (less memory)
train_text_encoder_only="${train_text_encoder_only:-0}" # 1: train only the text-encoder part
noise_offset="${noise_offset:-}"                # e.g. 0.1 for very dark/bright images (empty: off)
keep_tokens="${keep_tokens:-0}"                 # keep the first N caption tags in place when shuffling
min_snr_gamma="${min_snr_gamma:-}"              # min-SNR loss weighting, 5 is usual (empty: off)
clip_skip="${clip_skip:-2}"                     # text encoder layer from the end (SD 1.x only)
max_token_length="${max_token_length:-225}"     # 75, 150 or 225 caption tokens
mixed_precision="${mixed_precision:-fp16}"      # no | fp16 | bf16 (fp16 on a CPU computes in float32)
seed="${seed:-1337}"                            # random seed
min_bucket_reso="${min_bucket_reso:-256}"       # smallest aspect-ratio bucket side
max_bucket_reso="${max_bucket_reso:-1024}"      # largest aspect-ratio bucket side
bucket_reso_steps="${bucket_reso_steps:-}"      # bucket side step (empty: trainer default 64)
max_data_loader_n_workers="${max_data_loader_n_workers:-}" # image loader processes (empty: trainer default)
persistent_data_loader_workers="${persistent_data_loader_workers:-0}" # 1: keep loader workers between epochs

# ---- Learning rate and optimizer -----------------------------------------------------------------------------------
lr="${lr:-1e-4}"                                # base learning rate
unet_lr="${unet_lr:-1e-4}"                      # U-Net learning rate
text_encoder_lr="${text_encoder_lr:-1e-5}"      # text encoder learning rate
lr_scheduler="${lr_scheduler:-cosine_with_restarts}" # linear, cosine, cosine_with_restarts, polynomial, constant, constant_with_warmup
lr_warmup_steps="${lr_warmup_steps:-0}"         # warmup steps (keep 0 for constant)
lr_restart_cycles="${lr_restart_cycles:-1}"     # restarts, for cosine_with_restarts only
optimizer_type="${optimizer_type:-AdamW8bit}"   # AdamW8bit (needs bitsandbytes + CUDA), AdamW, Lion, Prodigy, AdaFactor, ...

# ---- Output --------------------------------------------------------------------------------------------------------
output_name="${output_name:-my_lora}"           # file name (and log prefix) of the trained network
output_dir="${output_dir:-./output}"            # where networks (and states) are saved
logging_dir="${logging_dir:-./logs}"            # TensorBoard logs (view with scripts/tensorboard.sh)
save_model_as="${save_model_as:-safetensors}"   # safetensors | ckpt | pt
save_precision="${save_precision:-fp16}"        # float | fp16 | bf16
save_state="${save_state:-0}"                   # 1: also save the training state (to resume from)
resume="${resume:-}"                            # resume from this saved state folder

# ---- Launch --------------------------------------------------------------------------------------------------------
multi_gpu="${multi_gpu:-0}"                     # number of GPUs; 2 or more trains on that many (0/1: one device)
num_cpu_threads_per_process="${num_cpu_threads_per_process:-4}" # CPU threads per training process
extra_args="${extra_args:-}"                    # any other trainer flags, space separated, e.g. "--sample_every_n_epochs 1"

# ============= DO NOT MODIFY CONTENTS BELOW =========================================================================
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export TF_CPP_MIN_LOG_LEVEL=3

args=()        # trainer arguments
net_args=()    # --network_args key=value items
launch_args=() # accelerate launch arguments
fail() { echo "train.sh: $1" >&2; exit 2; }
add_arg() { if [[ -n "$2" ]]; then args+=("$1" "$2"); fi; }       # --flag value, left out when the value is empty
add_flag() { args+=("$1"); }                                       # a fixed switch
add_switch() { if [[ "$2" == "1" ]]; then args+=("$1"); fi; }      # a switch turned on by a 0/1 setting
add_net_arg() { if [[ -n "$2" ]]; then net_args+=("$1=$2"); fi; }  # one --network_args key=value
add_launch_arg() { if [[ -n "$2" ]]; then launch_args+=("$1=$2"); fi; }
add_launch_flag() { launch_args+=("$1"); }
add_extra() { if [[ -n "$1" ]]; then read -r -a _extra <<< "$1"; args+=("${_extra[@]}"); fi; }

# The flag table. scripts/train.ps1 has the same lines in PowerShell spelling, and tests/test_wrapper_scripts.py
# reads both tables and checks they match (keep one statement per line, one simple condition per `if`).
# BEGIN ARGUMENTS
add_launch_arg "--num_cpu_threads_per_process" "$num_cpu_threads_per_process"
if [[ "$sdxl" == "1" ]]; then
  train_script="sdxl_train_network.py"
else
  train_script="train_network.py"
fi
if [[ "$multi_gpu" -gt 1 ]]; then
  add_launch_flag "--multi_gpu"
  add_launch_arg "--num_processes" "$multi_gpu"
fi
if [[ -z "$network_module" ]]; then
  if [[ "$algo" == "loha" ]]; then
    network_module="networks.loha"
  elif [[ "$algo" == "lokr" ]]; then
    network_module="networks.lokr"
  elif [[ "$algo" == "oft" ]]; then
    network_module="networks.oft"
  elif [[ "$algo" == "dylora" ]]; then
    network_module="networks.dylora"
  elif [[ "$algo" == "locon" ]]; then
    network_module="networks.lora"
  elif [[ "$algo" == "lora" ]]; then
    network_module="networks.lora"
  else
    fail "unknown algo (use lora, locon, loha, lokr, oft or dylora)"
  fi
fi
if [[ "$algo" != "lora" ]]; then
  if [[ "$algo" != "oft" ]]; then
    if [[ "$algo" != "dylora" ]]; then
      add_net_arg "conv_dim" "$conv_dim"
      add_net_arg "conv_alpha" "$conv_alpha"
    fi
  fi
fi
if [[ "$network_module" == "lycoris.kohya" ]]; then
  add_net_arg "algo" "$algo"
fi
if [[ "$dropout" != "0" ]]; then
  add_net_arg "dropout" "$dropout"
fi
add_arg "--pretrained_model_name_or_path" "$pretrained_model"
if [[ "$model_type" == sd2* ]]; then
  add_flag "--v2"
else
  add_arg "--clip_skip" "$clip_skip"
fi
add_switch "--v_parameterization" "$parameterization"
add_arg "--train_data_dir" "$train_data_dir"
add_arg "--reg_data_dir" "$reg_data_dir"
add_arg "--resolution" "$resolution"
add_flag "--enable_bucket"
add_arg "--min_bucket_reso" "$min_bucket_reso"
add_arg "--max_bucket_reso" "$max_bucket_reso"
add_arg "--bucket_reso_steps" "$bucket_reso_steps"
add_arg "--caption_extension" ".txt"
add_flag "--shuffle_caption"
add_arg "--keep_tokens" "$keep_tokens"
add_arg "--max_token_length" "$max_token_length"
add_flag "--cache_latents"
add_arg "--network_module" "$network_module"
add_arg "--network_weights" "$network_weights"
add_arg "--network_dim" "$network_dim"
add_arg "--network_alpha" "$network_alpha"
add_switch "--network_train_unet_only" "$train_unet_only"
add_switch "--network_train_text_encoder_only" "$train_text_encoder_only"
add_arg "--optimizer_type" "$optimizer_type"
add_arg "--learning_rate" "$lr"
add_arg "--unet_lr" "$unet_lr"
add_arg "--text_encoder_lr" "$text_encoder_lr"
add_arg "--lr_scheduler" "$lr_scheduler"
add_arg "--lr_warmup_steps" "$lr_warmup_steps"
if [[ "$lr_scheduler" == "cosine_with_restarts" ]]; then
  add_arg "--lr_scheduler_num_cycles" "$lr_restart_cycles"
fi
add_arg "--train_batch_size" "$batch_size"
if [[ -n "$max_train_steps" ]]; then
  add_arg "--max_train_steps" "$max_train_steps"
else
  add_arg "--max_train_epochs" "$max_train_epoches"
fi
add_arg "--noise_offset" "$noise_offset"
add_arg "--min_snr_gamma" "$min_snr_gamma"
add_arg "--mixed_precision" "$mixed_precision"
add_arg "--seed" "$seed"
add_arg "--max_data_loader_n_workers" "$max_data_loader_n_workers"
add_switch "--persistent_data_loader_workers" "$persistent_data_loader_workers"
add_arg "--output_dir" "$output_dir"
add_arg "--output_name" "$output_name"
add_arg "--save_model_as" "$save_model_as"
add_arg "--save_precision" "$save_precision"
add_arg "--save_every_n_epochs" "$save_every_n_epochs"
add_switch "--save_state" "$save_state"
add_arg "--resume" "$resume"
add_arg "--logging_dir" "$logging_dir"
add_arg "--log_prefix" "$output_name"
add_extra "$extra_args"
# END ARGUMENTS

if [[ ${#net_args[@]} -gt 0 ]]; then
  args+=("--network_args" "${net_args[@]}")
fi
# launch.py is `accelerate launch` (same options) that keeps the trainer's one-line errors and exit code.
cmd=("${PYTHON:-python}" launch.py "${launch_args[@]}" "$train_script" "${args[@]}")

if [[ "${SD_TRAINER_PRINT_ONLY:-}" == "1" ]]; then
  printf '%s\n' "${cmd[@]}"
  exit 0
fi
echo "Running: ${cmd[*]}"
exec "${cmd[@]}"
