# Train from a TOML config (sd-scripts' --config_file layout), in the style of Akegarasu/lora-scripts' train_by_toml.ps1:
# edit the settings below, then run `.\scripts\train_by_toml.ps1` (from anywhere: it runs from the repository root).
#
# Every setting can also be given from the environment, e.g.
#   $env:config_file = "./configs/my_lora.toml"; .\scripts\train_by_toml.ps1
# $env:SD_TRAINER_PRINT_ONLY = "1" prints the command (one argument per line) and exits without training.
# $env:PYTHON picks the interpreter (default: python).
# scripts/train_by_toml.sh is the bash twin of this file: same settings, same defaults, same flags
# (tests/test_wrapper_scripts.py compares the two files; PowerShell itself is not run by the tests).

$__settings_before = @(Get-Variable | ForEach-Object { $_.Name })

$config_file = "./configs/lora.toml"        # training options as TOML (see configs/lora.toml)
$sample_prompts = ""                        # prompt file for preview images (empty: as in the TOML / none)
$script = "train_network.py"                # entry script: train_network.py, train_db.py,
                                            # train_textual_inversion.py, train_hypernetwork.py; SDXL:
                                            # sdxl_train_network.py, sdxl_train.py,
                                            # sdxl_train_textual_inversion.py
$multi_gpu = "0"                            # number of GPUs; 2 or more trains on that many (0/1: one device)
$num_cpu_threads_per_process = "4"          # CPU threads per training process
$extra_args = ""                            # other trainer flags (they override the TOML), space separated

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
$LaunchArgs = New-Object System.Collections.Generic.List[string] # accelerate launch arguments
function Add-Arg([string]$flag, [string]$value) { if ($value -ne "") { $TrainArgs.Add($flag); $TrainArgs.Add($value) } }
function Add-LaunchArg([string]$flag, [string]$value) { if ($value -ne "") { $LaunchArgs.Add("$flag=$value") } }
function Add-LaunchFlag([string]$flag) { $LaunchArgs.Add($flag) }
function Add-Extra([string]$value) { if ($value.Trim() -ne "") { foreach ($item in ($value.Trim() -split '\s+')) { $TrainArgs.Add($item) } } }

# The flag table; scripts/train_by_toml.sh has the same lines in bash spelling (checked by
# tests/test_wrapper_scripts.py).
# BEGIN ARGUMENTS
Add-LaunchArg "--num_cpu_threads_per_process" $num_cpu_threads_per_process
if ([int]$multi_gpu -gt 1) {
  Add-LaunchFlag "--multi_gpu"
  Add-LaunchArg "--num_processes" $multi_gpu
}
Add-Arg "--config_file" $config_file
Add-Arg "--sample_prompts" $sample_prompts
Add-Extra $extra_args
# END ARGUMENTS

$python = if ($env:PYTHON) { $env:PYTHON } else { "python" }
# launch.py is `accelerate launch` (same options) that keeps the trainer's one-line errors and exit code.
$cmd = @($python, "launch.py") + @($LaunchArgs) + @($script) + @($TrainArgs)

if ($env:SD_TRAINER_PRINT_ONLY -eq "1") {
  $cmd | ForEach-Object { Write-Output $_ }
  exit 0
}
Write-Output ("Running: " + ($cmd -join " "))
& $cmd[0] $cmd[1..($cmd.Count - 1)]
exit $LASTEXITCODE
