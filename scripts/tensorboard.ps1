# Open TensorBoard on the training logs (as Akegarasu/lora-scripts' tensorboard.ps1):
# run `.\scripts\tensorboard.ps1` and browse to http://localhost:6006.
# Settings can also be given from the environment, e.g. `$env:logdir = "./output/demo/logs"; .\scripts\tensorboard.ps1`.
# $env:SD_TRAINER_PRINT_ONLY = "1" prints the command (one argument per line) and exits.
# scripts/tensorboard.sh is the bash twin of this file: same settings, same defaults, same flags
# (tests/test_wrapper_scripts.py compares the two files; PowerShell itself is not run by the tests).

$__settings_before = @(Get-Variable | ForEach-Object { $_.Name })

$logdir = "./logs"                          # the logging_dir of the runs to show
$port = "6006"                              # port to serve on

# ============= DO NOT MODIFY CONTENTS BELOW =========================================================================
$ErrorActionPreference = "Stop"
# Environment overrides: every setting above whose name is set in the environment takes that value.
foreach ($__var in @(Get-Variable | Where-Object { $__settings_before -notcontains $_.Name })) {
  if ($__var.Name -like "__*") { continue }
  $__value = [Environment]::GetEnvironmentVariable($__var.Name)
  if ($__value) { Set-Variable -Name $__var.Name -Value $__value }
}
Set-Location (Split-Path -Parent $PSScriptRoot)

$TbArgs = New-Object System.Collections.Generic.List[string]
function Add-Arg([string]$flag, [string]$value) { if ($value -ne "") { $TbArgs.Add($flag); $TbArgs.Add($value) } }

# The flag table; scripts/tensorboard.sh has the same lines in bash spelling (checked by tests/test_wrapper_scripts.py).
# BEGIN ARGUMENTS
Add-Arg "--logdir" $logdir
Add-Arg "--port" $port
# END ARGUMENTS

if (Get-Command tensorboard -ErrorAction SilentlyContinue) {
  $cmd = @("tensorboard") + @($TbArgs)
} else {
  $python = if ($env:PYTHON) { $env:PYTHON } else { "python" }
  $cmd = @($python, "-m", "tensorboard.main") + @($TbArgs)
}

if ($env:SD_TRAINER_PRINT_ONLY -eq "1") {
  $cmd | ForEach-Object { Write-Output $_ }
  exit 0
}
Write-Output ("Running: " + ($cmd -join " "))
& $cmd[0] $cmd[1..($cmd.Count - 1)]
exit $LASTEXITCODE
