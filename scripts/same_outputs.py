#!/usr/bin/env python
"""Same seeds, same files: train on the tiny models with two versions of the code and compare every output.

    python scripts/same_outputs.py                       # ad92158 against the working tree
    python scripts/same_outputs.py --base REV --head REV # any two commits
    python scripts/same_outputs.py --base ad92158 --head ad92158   # honesty check: must say "all identical"

Each side is a clean copy in a temporary folder (`git archive REV`, or for the working tree the tracked and
untracked-but-not-ignored files of `git ls-files -co --exclude-standard`). Every run is a separate
`python <trainer>.py ...` process with that copy as its working directory and first on PYTHONPATH, one torch
thread, CPU only, a fixed --seed, and only relative paths, so nothing about the copy's location can reach a file.
The dataset is written once (by the base side's own `library.data.demo.make_demo_dataset`) and copied to both.

Then every output file of the same name is compared:
  * .safetensors: the tensors byte for byte (names, dtypes, shapes, data) and the metadata dict, except the keys
    in VARYING_METADATA (the wall-clock times ss_training_started_at, ss_training_finished_at, modelspec.date,
    and sshs_legacy_hash, whose byte window moves with the length of those times in the header);
  * sample PNGs: the `YYYYmmddHHMMSS` stamp sd-scripts puts in their names is replaced by `<time>`, then bytes;
  * everything else (.pt, .ckpt, .toml, .json, .png, ...): bytes.
Exit 0 and "N files, all identical" when so; exit 1 listing what differs otherwise (2: a run failed).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_BASE = "ad92158"
WORK = "_same_outputs"  # folder inside each copy holding the data, prompts and outputs (relative paths only)

# Metadata keys whose values differ between two runs of the same commit with the same seed (found by running
# this script with --base X --head X); they are left out of the comparison, everything else must be equal.
VARYING_METADATA = {
    "ss_training_started_at",    # time.time() when training began
    "ss_training_finished_at",   # time.time() at save
    "modelspec.date",            # datetime.now() at save, to the second
    # sha256 of the 64 KiB at offset 1 MiB of the file serialised with its ss_* metadata: for a file over 1 MiB
    # (loha_cached, 1.26 MB) the header before that offset holds the two times above, whose printed length varies
    # ('1796298857.335489' vs '1796298857.5347335'), so the window shifts: 450be051 vs d7ce7478 run to run.
    "sshs_legacy_hash",
}
# Compared, although they look as if they might vary: ss_session_id is random.randint() drawn *after* --seed
# seeded the global RNG (as in sd-scripts), so it repeats; sshs_model_hash hashes only the tensor bytes after the
# header, so it repeats too (and catches any tensor change).

# Sample images are named `<name>_<step|eEPOCH>_<enum>_<YYYYmmddHHMMSS>[_seed].png` (sd-scripts' scheme).
SAMPLE_STAMP = re.compile(r"_(\d{14})(?=(_\d+)?\.png$)")

# ---- the runs ---------------------------------------------------------------------------------------------------
D = f"{WORK}/data"
COMMON = ["--caption_extension", ".txt", "--resolution", "32", "--train_batch_size", "2", "--learning_rate", "1e-3",
          "--max_data_loader_n_workers", "0"]


def _net(name, model, steps, *extra, script="train_network.py"):
    return (name, script,
            ["--pretrained_model_name_or_path", model, "--train_data_dir", f"{D}/net", *COMMON,
             "--output_dir", f"{WORK}/out/{name}", "--output_name", name, "--max_train_steps", str(steps),
             "--network_dim", "4", "--network_alpha", "2", "--seed", "1", *extra])


RUNS = [
    # LoRA + LoCon (conv dims), text encoder trained too (the default), AdamW, and one sample image at the end
    _net("lora_locon_te", "tiny-sd1", 3, "--network_module", "networks.lora", "--network_args", "conv_dim=2",
         "conv_alpha=1", "--sample_prompts", f"{WORK}/prompts.txt", "--sample_every_n_steps", "3",
         "--sample_sampler", "euler_a"),
    # LoHa, U-Net only, explicitly cached latents and text-encoder outputs, noise offset and min-SNR weighting
    _net("loha_cached", "tiny-sd1", 3, "--network_module", "networks.loha", "--network_args", "conv_dim=2",
         "--network_train_unet_only", "--cache_latents", "--cache_text_encoder_outputs", "--noise_offset", "0.05",
         "--min_snr_gamma", "5"),
    # U-Net only without the cache flags, held-out images validated: the text encoder is frozen and the captions
    # fixed, so every caption is encoded before the first step and the encoder released (as the flag would do)
    _net("lora_unet_only", "tiny-sd1", 3, "--network_module", "networks.lora", "--network_train_unet_only",
         "--cache_latents", "--validation_split", "0.25", "--validate_every_n_steps", "1"),
    _net("sdxl_unet_only", "tiny-sdxl", 2, "--network_module", "networks.lora", "--network_train_unet_only",
         script="sdxl_train_network.py"),
    # LoKr with a warmup + cosine schedule and fp16 saving
    _net("lokr", "tiny-sd1", 3, "--network_module", "networks.lokr", "--network_args", "factor=4",
         "--lr_scheduler", "cosine", "--lr_warmup_steps", "1", "--save_precision", "fp16"),
    # SD 2.x tiny model, trained as a v-prediction model
    _net("lora_sd2_v", "tiny-sd2", 2, "--network_module", "networks.lora", "--v2", "--v_parameterization"),
    # SDXL: U-Net-only LoRA with both caches (the usual SDXL setting; the text encoders are released before the
    # latents are cached), and LoCon with both text encoders trained and an SDXL sample image
    _net("sdxl_cached", "tiny-sdxl", 2, "--network_module", "networks.lora", "--network_train_unet_only",
         "--cache_latents", "--cache_text_encoder_outputs", script="sdxl_train_network.py"),
    _net("sdxl_locon_te", "tiny-sdxl", 2, "--network_module", "networks.lora", "--network_args", "conv_dim=2",
         "conv_alpha=1", "--sample_prompts", f"{WORK}/prompts.txt", "--sample_every_n_steps", "2",
         "--sample_sampler", "euler_a", script="sdxl_train_network.py"),
    # Dreambooth full fine-tune with regularisation images, one .safetensors checkpoint
    ("db", "train_db.py",
     ["--pretrained_model_name_or_path", "tiny-sd1", "--train_data_dir", f"{D}/db", "--reg_data_dir", f"{D}/reg",
      "--prior_loss_weight", "1.0", *COMMON, "--output_dir", f"{WORK}/out/db", "--output_name", "db",
      "--max_train_steps", "2", "--seed", "3", "--save_model_as", "safetensors"]),
    # Textual inversion, two vectors per token, A1111 .pt embedding
    ("ti", "train_textual_inversion.py",
     ["--pretrained_model_name_or_path", "tiny-sd1", "--train_data_dir", f"{D}/ti", *COMMON[:-4],
      "--learning_rate", "1e-2", "--max_data_loader_n_workers", "0", "--output_dir", f"{WORK}/out/ti",
      "--max_train_steps", "2", "--seed", "3", "--token_string", "mychar", "--init_word", "circle shape",
      "--num_vectors_per_token", "2"]),
    # Hypernetwork, A1111 .pt
    ("hn", "train_hypernetwork.py",
     ["--pretrained_model_name_or_path", "tiny-sd1", "--train_data_dir", f"{D}/db", *COMMON,
      "--output_dir", f"{WORK}/out/hn", "--output_name", "hn", "--max_train_steps", "2", "--seed", "3",
      "--hypernetwork_sizes", "32,64", "--hypernetwork_layer_structure", "1,2,1"]),
]

PROMPTS = "sks shape, red --w 32 --h 32 --d 7 --s 2\n"

MAKE_DATA = f"""
from pathlib import Path
from library.data.demo import make_demo_dataset
d = Path({D!r})
make_demo_dataset(d / "net", count=4, size=32, folder="2_sks shape")
make_demo_dataset(d / "db", count=4, size=32, folder="2_sks shape")
make_demo_dataset(d / "reg", count=2, size=32, seed=1, folder="1_shape")
ti = make_demo_dataset(d / "ti", count=4, size=32, folder="2_mychar shape")
for caption in Path(ti).glob("*.txt"):
    caption.write_text(caption.read_text().replace("sks shape", "mychar"))
"""


# ---- copies -------------------------------------------------------------------------------------------------------
def _git(*args: str) -> bytes:
    return subprocess.run(["git", "-C", str(ROOT), *args], check=True, capture_output=True).stdout


def copy_rev(rev: str, dest: Path) -> str:
    """Extract `rev` into dest; return the full commit id."""
    commit = _git("rev-parse", "--verify", f"{rev}^{{commit}}").decode().strip()
    dest.mkdir(parents=True)
    archive = subprocess.Popen(["git", "-C", str(ROOT), "archive", commit], stdout=subprocess.PIPE)
    subprocess.run(["tar", "-x", "-C", str(dest)], stdin=archive.stdout, check=True)
    if archive.wait() != 0:
        raise SystemExit(f"git archive {rev} failed")
    return commit[:12]


def copy_worktree(dest: Path) -> str:
    """Copy the working tree's tracked + untracked-not-ignored files (as they are now) into dest."""
    dest.mkdir(parents=True)
    for name in sorted(set(_git("ls-files", "-co", "--exclude-standard", "-z").decode().split("\0")) - {""}):
        src = ROOT / name
        if src.is_file() and not src.is_symlink():  # a tracked file deleted in the tree is simply absent
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    return "worktree"


# ---- running ------------------------------------------------------------------------------------------------------
def _env(copy: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "TORCH", "OMP_", "MKL_"))}
    env.update(PYTHONPATH=str(copy), PYTHONHASHSEED="0", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               CUDA_VISIBLE_DEVICES="", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TZ="UTC",
               PYTHONDONTWRITEBYTECODE="1")
    return env


def run_one(copy: Path, side: str, name: str, script: str, argv: list[str]) -> tuple[str, str, float, str | None]:
    log = copy / WORK / "logs" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    with open(log, "w") as f:
        rc = subprocess.run([sys.executable, script, *argv], cwd=copy, env=_env(copy), stdout=f,
                            stderr=subprocess.STDOUT, check=False).returncode
    took = time.monotonic() - start
    if rc != 0:
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-15:])
        return side, name, took, f"exit {rc}, log {log}:\n{tail}"
    return side, name, took, None


def prepare(copy: Path, data_from: Path | None) -> None:
    (copy / WORK).mkdir(exist_ok=True)
    (copy / WORK / "prompts.txt").write_text(PROMPTS)
    if data_from is None:
        subprocess.run([sys.executable, "-c", MAKE_DATA], cwd=copy, env=_env(copy), check=True)
    else:
        shutil.copytree(data_from / WORK / "data", copy / WORK / "data")


# ---- comparing ----------------------------------------------------------------------------------------------------
def outputs(copy: Path) -> dict[str, Path]:
    """Normalised relative name -> file, for every file the runs wrote."""
    out = copy / WORK / "out"
    files = {}
    for path in sorted(p for p in out.rglob("*") if p.is_file()):
        files[SAMPLE_STAMP.sub("_<time>", path.relative_to(out).as_posix())] = path
    return files


def _read_safetensors(path: Path) -> tuple[dict, dict, bytes]:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    metadata = header.pop("__metadata__", {}) or {}
    return header, metadata, data[8 + n:]


def _short(value: str) -> str:
    return value if len(value) <= 60 else value[:57] + "..."


def compare_safetensors(a: Path, b: Path) -> list[str]:
    ha, ma, da = _read_safetensors(a)
    hb, mb, db = _read_safetensors(b)
    problems = []
    if ha.keys() != hb.keys():
        only_a, only_b = sorted(ha.keys() - hb.keys()), sorted(hb.keys() - ha.keys())
        problems.append(f"tensor names differ: only base {only_a[:5]}, only head {only_b[:5]}")
    diff = []
    for key in sorted(ha.keys() & hb.keys()):
        ta, tb = ha[key], hb[key]
        if ta["dtype"] != tb["dtype"] or ta["shape"] != tb["shape"]:
            problems.append(f"{key}: {ta['dtype']}{ta['shape']} vs {tb['dtype']}{tb['shape']}")
        elif da[slice(*ta["data_offsets"])] != db[slice(*tb["data_offsets"])]:
            diff.append(key)
    if diff:
        problems.append(f"{len(diff)}/{len(ha)} tensors differ in value, e.g. {diff[:3]}")
    for key in sorted((ma.keys() | mb.keys()) - VARYING_METADATA):
        if ma.get(key) != mb.get(key):
            va, vb = (str(m.get(key, "<absent>")) for m in (ma, mb))
            problems.append(f"metadata {key}: {_short(va)!r} vs {_short(vb)!r}")
    return problems


def compare_file(a: Path, b: Path) -> list[str]:
    if a.suffix == ".safetensors":
        return compare_safetensors(a, b)
    da, db = a.read_bytes(), b.read_bytes()
    if da == db:
        return []
    detail = f"bytes differ ({len(da)} vs {len(db)} bytes)"
    if a.suffix == ".png":
        try:
            import numpy as np
            from PIL import Image
            pa, pb = (np.asarray(Image.open(p).convert("RGB"), dtype=np.int16) for p in (a, b))
            if pa.shape != pb.shape:
                detail += f"; image sizes {pa.shape} vs {pb.shape}"
            else:
                detail += f"; pixels: max abs diff {int(abs(pa - pb).max())}, {int((pa != pb).any(-1).sum())} differ"
        except Exception as e:  # noqa: BLE001 - only extra detail
            detail += f" ({e})"
    return [detail]


# ---- main ---------------------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default=DEFAULT_BASE, help=f"the 'before' commit (default {DEFAULT_BASE})")
    head = parser.add_mutually_exclusive_group()
    head.add_argument("--head", help="the 'after' commit (default: the working tree)")
    head.add_argument("--worktree", action="store_true", help="compare against the working tree (the default)")
    parser.add_argument("--jobs", type=int, default=max(1, min(4, os.cpu_count() or 1)),
                        help="runs at once (each uses one torch thread)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary copies and print where they are")
    parser.add_argument("--no-ignore", action="store_true",
                        help="compare every metadata key too (shows which ones vary from run to run)")
    parser.add_argument("--only", nargs="*", metavar="RUN", help=f"only these runs: {' '.join(r[0] for r in RUNS)}")
    args = parser.parse_args(argv)

    if args.no_ignore:
        VARYING_METADATA.clear()
    runs = [r for r in RUNS if not args.only or r[0] in args.only]
    started = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="same_outputs_"))
    try:
        base_dir, head_dir = tmp / "base", tmp / "head"
        base_id = copy_rev(args.base, base_dir)
        head_id = copy_rev(args.head, head_dir) if args.head else copy_worktree(head_dir)
        print(f"base {args.base} ({base_id}) vs head {args.head or 'working tree'} ({head_id}) in {tmp}", flush=True)
        prepare(base_dir, None)
        prepare(head_dir, base_dir)

        # All base runs are queued before all head runs, so the two sides run some seconds apart and anything
        # that depends on the clock shows up as a difference.
        jobs = [(d, side, *r) for d, side in ((base_dir, "base"), (head_dir, "head")) for r in runs]
        failures = []
        with ThreadPoolExecutor(args.jobs) as pool:
            for side, name, took, error in pool.map(lambda j: run_one(*j), jobs):
                print(f"  ran {side:4} {name:14} {took:5.1f} s" + ("  FAILED" if error else ""), flush=True)
                if error:
                    failures.append(f"{side} {name}: {error}")
        if failures:
            print("\n".join(failures))
            return 2

        a, b = outputs(base_dir), outputs(head_dir)
        differences = []
        for name in sorted(a.keys() | b.keys()):
            if name not in b or name not in a:
                differences.append(f"only in {'base' if name in a else 'head'}: {name}")
                print(f"DIFF  {name}  (only in {'base' if name in a else 'head'})")
                continue
            problems = compare_file(a[name], b[name])
            if problems:
                differences.append(name)
                print(f"DIFF  {name}")
                for p in problems:
                    print(f"        {p}")
            else:
                print(f"same  {name}")
        elapsed = time.monotonic() - started
        total = len(a.keys() | b.keys())
        if differences:
            print(f"{total} files, {len(differences)} differ ({elapsed:.0f} s)")
            return 1
        ignored = ", ".join(sorted(VARYING_METADATA))
        print(f"{total} files, all identical ({elapsed:.0f} s; ignored metadata: {ignored})")
        return 0
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
