# LoRA / LoCon / LoHa / LoKr training for Stable Diffusion 1.x/2.x (and SDXL: $sdxl = "1"), in the style of
# Akegarasu/lora-scripts' train.ps1:
# edit the settings below, then run `.\scripts\train.ps1` (from anywhere: it runs from the repository root).
#
# Every setting can also be given from the environment without editing this file, e.g.
#   $env:train_data_dir = "./train/mychar"; $env:algo = "locon"; .\scripts\train.ps1
# $env:SD_TRAINER_PRINT_ONLY = "1" prints the command (one argument per line) and exits without training.
# $env:PYTHON picks the interpreter (default: python).
# scripts/train.sh is the bash twin of this file: same settings, same defaults, same flags
# (tests/test_wrapper_scripts.py compares the two files line by line; PowerShell itself is not run by the tests).
# An empty value leaves its flag out (the trainer's own default applies).

$__settings_before = @(Get-Variable | ForEach-Object { $_.Name })

# ---- Model ---------------------------------------------------------------------------------------------------------
$pretrained_model = "./sd-models/model.safetensors" # base model: .safetensors/.ckpt file, diffusers folder, or a Hub id
$sdxl = "0"                                 # 1: an SDXL model, trained by sdxl_train_network.py (keep model_type=sd1)
$model_type = "sd1"                         # sd1 (SD 1.x) or sd2 (SD 2.x; clip_skip is then not passed)
$parameterization = "0"                     # 1: v-parameterization (SD 2.x 768-v models), with model_type=sd2
$train_data_dir = "./train/data"            # training images: folders named <repeats>_<class tokens>, captions in .txt
$reg_data_dir = ""                          # regularisation images, same layout (empty: none)

# ---- Network -------------------------------------------------------------------------------------------------------
$algo = "lora"                              # lora | locon (LoRA + conv layers) | loha | lokr | oft (network_alpha: its constraint, e.g. 1e-3) | dylora
$network_module = ""                        # empty: chosen from algo (networks.lora/loha/lokr/oft/dylora); or e.g. lycoris.kohya
$network_weights = ""                       # continue from these adapter weights (empty: start fresh)
$network_dim = "32"                         # rank, usually 4..128
$network_alpha = "32"                       # alpha, usually network_dim or half of it (smaller needs a higher lr)
$conv_dim = "4"                             # conv rank for locon/loha/lokr (not used by plain lora)
$conv_alpha = "4"                           # conv alpha for locon/loha/lokr
$dropout = "0"                              # adapter dropout, 0 = off (passed as --network_args dropout=...)

# ---- Training ------------------------------------------------------------------------------------------------------
$resolution = "512,512"                     # width,height (a single number for a square)
$batch_size = "1"                           # images per step
$max_train_epoches = "10"                   # epochs to train
$max_train_steps = ""                       # when set: train this many steps instead of max_train_epoches
$save_every_n_epochs = "2"                  # also save every N epochs
$train_unet_only = "0"                      # 1: train only the U-Net part (less memory)
$train_text_encoder_only = "0"              # 1: train only the text-encoder part
$noise_offset = ""                          # e.g. 0.1 for very dark/bright images (empty: off)
$keep_tokens = "0"                          # keep the first N caption tags in place when shuffling
$min_snr_gamma = ""                         # min-SNR loss weighting, 5 is usual (empty: off)
$clip_skip = "2"                            # text encoder layer from the end (SD 1.x only)
$max_token_length = "225"                   # 75, 150 or 225 caption tokens
$mixed_precision = "fp16"                   # no | fp16 | bf16 (fp16 on a CPU computes in float32)
$seed = "1337"                              # random seed
$min_bucket_reso = "256"                    # smallest aspect-ratio bucket side
$max_bucket_reso = "1024"                   # largest aspect-ratio bucket side
$bucket_reso_steps = ""                     # bucket side step (empty: trainer default 64)
$max_data_loader_n_workers = ""             # image loader processes (empty: trainer default)
$persistent_data_loader_workers = "0"       # 1: keep loader workers between epochs

# ---- Learning rate and optimizer -----------------------------------------------------------------------------------
$lr = "1e-4"                                # base learning rate
$unet_lr = "1e-4"                           # U-Net learning rate
$text_encoder_lr = "1e-5"                   # text encoder learning rate
$lr_scheduler = "cosine_with_restarts"      # linear, cosine, cosine_with_restarts, polynomial, constant, constant_with_warmup
$lr_warmup_steps = "0"                      # warmup steps (keep 0 for constant)
$lr_restart_cycles = "1"                    # restarts, for cosine_with_restarts only
$optimizer_type = "AdamW8bit"               # AdamW8bit (needs bitsandbytes + CUDA), AdamW, Lion, Prodigy, AdaFactor, ...

# ---- Output --------------------------------------------------------------------------------------------------------
$output_name = "my_lora"                    # file name (and log prefix) of the trained network
$output_dir = "./output"                    # where networks (and states) are saved
$logging_dir = "./logs"                     # TensorBoard logs (view with scripts/tensorboard.ps1)
$save_model_as = "safetensors"              # safetensors | ckpt | pt
$save_precision = "fp16"                    # float | fp16 | bf16
$save_state = "0"                           # 1: also save the training state (to resume from)
$resume = ""                                # resume from this saved state folder

# ---- Launch --------------------------------------------------------------------------------------------------------
$multi_gpu = "0"                            # number of GPUs; 2 or more trains on that many (0/1: one device)
$num_cpu_threads_per_process = "4"          # CPU threads per training process
$extra_args = ""                            # any other trainer flags, space separated, e.g. "--sample_every_n_epochs 1"

# ============= DO NOT MODIFY CONTENTS BELOW =========================================================================
$ErrorActionPreference = "Stop"
# Environment overrides: every setting above whose name is set in the environment takes that value.
foreach ($__var in @(Get-Variable | Where-Object { $__settings_before -notcontains $_.Name })) {
  if ($__var.Name -like "__*") { continue }
  $__value = [Environment]::GetEnvironmentVariable($__var.Name)
  if ($__value) { Set-Variable -Name $__var.Name -Value $__value }
}
Set-Location (Split-Path -Parent $PSScriptRoot)
$env:TF_CPP_MIN_LOG_LEVEL = "3"

$TrainArgs = New-Object System.Collections.Generic.List[string]  # trainer arguments
$NetArgs = New-Object System.Collections.Generic.List[string]    # --network_args key=value items
$LaunchArgs = New-Object System.Collections.Generic.List[string] # accelerate launch arguments
function Fail([string]$message) { [Console]::Error.WriteLine("train.ps1: $message"); exit 2 }
function Add-Arg([string]$flag, [string]$value) { if ($value -ne "") { $TrainArgs.Add($flag); $TrainArgs.Add($value) } }
function Add-Flag([string]$flag) { $TrainArgs.Add($flag) }
function Add-Switch([string]$flag, [string]$value) { if ($value -eq "1") { $TrainArgs.Add($flag) } }
function Add-NetArg([string]$key, [string]$value) { if ($value -ne "") { $NetArgs.Add("$key=$value") } }
function Add-LaunchArg([string]$flag, [string]$value) { if ($value -ne "") { $LaunchArgs.Add("$flag=$value") } }
function Add-LaunchFlag([string]$flag) { $LaunchArgs.Add($flag) }
function Add-Extra([string]$value) { if ($value.Trim() -ne "") { foreach ($item in ($value.Trim() -split '\s+')) { $TrainArgs.Add($item) } } }

# The flag table. scripts/train.sh has the same lines in bash spelling, and tests/test_wrapper_scripts.py
# reads both tables and checks they match (keep one statement per line, one simple condition per `if`).
# BEGIN ARGUMENTS
Add-LaunchArg "--num_cpu_threads_per_process" $num_cpu_threads_per_process
if ($sdxl -eq "1") {
  $train_script = "sdxl_train_network.py"
} else {
  $train_script = "train_network.py"
}
if ([int]$multi_gpu -gt 1) {
  Add-LaunchFlag "--multi_gpu"
  Add-LaunchArg "--num_processes" $multi_gpu
}
if ($network_module -eq "") {
  if ($algo -eq "loha") {
    $network_module = "networks.loha"
  } elseif ($algo -eq "lokr") {
    $network_module = "networks.lokr"
  } elseif ($algo -eq "oft") {
    $network_module = "networks.oft"
  } elseif ($algo -eq "dylora") {
    $network_module = "networks.dylora"
  } elseif ($algo -eq "locon") {
    $network_module = "networks.lora"
  } elseif ($algo -eq "lora") {
    $network_module = "networks.lora"
  } else {
    Fail "unknown algo (use lora, locon, loha, lokr, oft or dylora)"
  }
}
if ($algo -ne "lora") {
  if ($algo -ne "oft") {
    if ($algo -ne "dylora") {
      Add-NetArg "conv_dim" $conv_dim
      Add-NetArg "conv_alpha" $conv_alpha
    }
  }
}
if ($network_module -eq "lycoris.kohya") {
  Add-NetArg "algo" $algo
}
if ($dropout -ne "0") {
  Add-NetArg "dropout" $dropout
}
Add-Arg "--pretrained_model_name_or_path" $pretrained_model
if ($model_type -like "sd2*") {
  Add-Flag "--v2"
} else {
  Add-Arg "--clip_skip" $clip_skip
}
Add-Switch "--v_parameterization" $parameterization
Add-Arg "--train_data_dir" $train_data_dir
Add-Arg "--reg_data_dir" $reg_data_dir
Add-Arg "--resolution" $resolution
Add-Flag "--enable_bucket"
Add-Arg "--min_bucket_reso" $min_bucket_reso
Add-Arg "--max_bucket_reso" $max_bucket_reso
Add-Arg "--bucket_reso_steps" $bucket_reso_steps
Add-Arg "--caption_extension" ".txt"
Add-Flag "--shuffle_caption"
Add-Arg "--keep_tokens" $keep_tokens
Add-Arg "--max_token_length" $max_token_length
Add-Flag "--cache_latents"
Add-Arg "--network_module" $network_module
Add-Arg "--network_weights" $network_weights
Add-Arg "--network_dim" $network_dim
Add-Arg "--network_alpha" $network_alpha
Add-Switch "--network_train_unet_only" $train_unet_only
Add-Switch "--network_train_text_encoder_only" $train_text_encoder_only
Add-Arg "--optimizer_type" $optimizer_type
Add-Arg "--learning_rate" $lr
Add-Arg "--unet_lr" $unet_lr
Add-Arg "--text_encoder_lr" $text_encoder_lr
Add-Arg "--lr_scheduler" $lr_scheduler
Add-Arg "--lr_warmup_steps" $lr_warmup_steps
if ($lr_scheduler -eq "cosine_with_restarts") {
  Add-Arg "--lr_scheduler_num_cycles" $lr_restart_cycles
}
Add-Arg "--train_batch_size" $batch_size
if ($max_train_steps -ne "") {
  Add-Arg "--max_train_steps" $max_train_steps
} else {
  Add-Arg "--max_train_epochs" $max_train_epoches
}
Add-Arg "--noise_offset" $noise_offset
Add-Arg "--min_snr_gamma" $min_snr_gamma
Add-Arg "--mixed_precision" $mixed_precision
Add-Arg "--seed" $seed
Add-Arg "--max_data_loader_n_workers" $max_data_loader_n_workers
Add-Switch "--persistent_data_loader_workers" $persistent_data_loader_workers
Add-Arg "--output_dir" $output_dir
Add-Arg "--output_name" $output_name
Add-Arg "--save_model_as" $save_model_as
Add-Arg "--save_precision" $save_precision
Add-Arg "--save_every_n_epochs" $save_every_n_epochs
Add-Switch "--save_state" $save_state
Add-Arg "--resume" $resume
Add-Arg "--logging_dir" $logging_dir
Add-Arg "--log_prefix" $output_name
Add-Extra $extra_args
# END ARGUMENTS

if ($NetArgs.Count -gt 0) {
  $TrainArgs.Add("--network_args")
  $TrainArgs.AddRange($NetArgs)
}
$python = if ($env:PYTHON) { $env:PYTHON } else { "python" }
# launch.py is `accelerate launch` (same options) that keeps the trainer's one-line errors and exit code.
$cmd = @($python, "launch.py") + @($LaunchArgs) + @($train_script) + @($TrainArgs)

if ($env:SD_TRAINER_PRINT_ONLY -eq "1") {
  $cmd | ForEach-Object { Write-Output $_ }
  exit 0
}
Write-Output ("Running: " + ($cmd -join " "))
& $cmd[0] $cmd[1..($cmd.Count - 1)]
exit $LASTEXITCODE
