"""Pivotal tuning (--train_embeddings): new token embeddings trained together with a network (ours; sd-scripts has
none, diffusers' advanced DreamBooth script and OneTrainer have it).

Each `TOKEN:N[:INIT WORDS]` adds N vectors (`TOKEN TOKEN1 … TOKEN{N-1}`, written out for the text encoder as a
textual inversion is) to every text encoder, initialised from the init words' rows or around the mean row, trained at
--embedding_lr. The network file carries them as AUTOMATIC1111's bundle (`bundle_emb.<TOKEN>.string_to_param.*`;
SDXL `bundle_emb.<TOKEN>.clip_l` / `.clip_g`), which A1111 loads with the LoRA; each is also written as its own
embedding file (sd-scripts' safetensors layout, which ComfyUI, diffusers and A1111 read) into
`<network stem>-embeddings/<TOKEN>.safetensors`, since ComfyUI and diffusers do not read bundles.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from library.errors import UserError
from library.methods.ti_method import (NewTokenEmbedding, TokenExpandingEncoder, VectorsState, add_new_tokens,
                                       initial_vectors)

FLAG = "--train_embeddings"
_TOKEN = re.compile(r"[^\s.,:<>()\[\]{}]+")


@dataclass(frozen=True)
class EmbeddingSpec:
    token: str
    count: int
    init_word: str | None

    @property
    def tokens(self) -> list[str]:
        return [self.token] + [f"{self.token}{i}" for i in range(1, self.count)]


def parse_specs(values) -> list[EmbeddingSpec]:
    """--train_embeddings mychar:4 "style:2:oil painting" -> specs; bad values are one-line errors."""
    specs = []
    for value in values or []:
        token, _, rest = str(value).partition(":")
        count_text, _, init = rest.partition(":")
        if not _TOKEN.fullmatch(token):
            raise UserError(f"{FLAG} {value!r}: the token must be one word without spaces, dots, commas, colons or "
                            "brackets (AUTOMATIC1111 splits bundle keys at dots), e.g. mychar:4")
        try:
            count = int(count_text) if count_text else 1
        except ValueError:
            count = 0
        if count < 1:
            raise UserError(f"{FLAG} {value!r}: the vector count after the token must be a whole number of 1 or more, "
                            "e.g. mychar:4")
        specs.append(EmbeddingSpec(token, count, init.strip() or None))
    names = [s.token.lower() for s in specs]
    clash = next((n for n in names if names.count(n) > 1), None)
    if clash:
        raise UserError(f"{FLAG}: the token '{clash}' is given twice (CLIP lower-cases text); give each once")
    return specs


class PivotalEmbeddings:
    """The new tokens in every tokenizer and text encoder; call `train_on(device)` after the models are frozen."""

    def __init__(self, specs: list[EmbeddingSpec], parts, *, start: dict[str, list[torch.Tensor]] | None = None,
                 source: str | None = None):
        self.specs = specs
        self.parts = parts
        self.keys = parts.family.embedding_keys()  # ("emb_params",) or ("clip_l", "clip_g")
        tokens = [t for spec in specs for t in spec.tokens]
        self.embeddings: list[NewTokenEmbedding] = []
        self._initial: list[torch.Tensor] = []
        for index, (text_encoder, tokenizer) in enumerate(zip(parts.text_encoders, parts.tokenizers)):
            base = text_encoder.get_input_embeddings()
            rows = [self._start_rows(spec, index, base.weight.shape[1], start, source) for spec in specs]
            vectors = torch.cat([
                row if row is not None else initial_vectors(tokenizer, base.weight.detach(), spec.count,
                                                            init_word=spec.init_word, flag=f"{FLAG} {spec.token}",
                                                            say=index == 0)
                for spec, row in zip(specs, rows)])
            first_id = add_new_tokens(tokenizer, tokens, flag=FLAG,
                                      fix="it has an embedding of its own; choose a made-up word (e.g. 'mychar')")
            self._initial.append(vectors)
            self.embeddings.append(NewTokenEmbedding(base, first_id, vectors))
            text_encoder.set_input_embeddings(self.embeddings[-1])

    def _start_rows(self, spec: EmbeddingSpec, index: int, width: int, start, source) -> torch.Tensor | None:
        if not start or spec.token not in start:
            return None
        rows = start[spec.token][index]
        if rows.shape[0] != spec.count or rows.shape[1] != width:
            raise UserError(f"--network_weights {source}: its bundled embedding '{spec.token}' is "
                            f"{tuple(rows.shape)}, but {FLAG} {spec.token}:{spec.count} on this model needs "
                            f"({spec.count}, {width}); give the file's vector count")
        return rows.float()

    def train_on(self, device: torch.device) -> None:
        """The vectors in float32 on the device, trainable (the models' freeze cast them to the weight dtype)."""
        for embedding, vectors in zip(self.embeddings, self._initial):
            embedding.vectors.data = vectors.detach().float().to(device)
            embedding.vectors.requires_grad_(True)
        self._initial = []

    def expand(self, encode):
        """The prompt encoding with each multi-vector token written out (captions and sample prompts alike)."""
        for spec in self.specs:
            encode = TokenExpandingEncoder(encode, spec.token, spec.tokens)
        return encode

    def parameters(self) -> list[torch.nn.Parameter]:
        return [embedding.vectors for embedding in self.embeddings]

    def checkpoint_objects(self) -> list:
        return [VectorsState(embedding) for embedding in self.embeddings]

    def vectors(self, dtype: torch.dtype | None = None) -> dict[str, dict[str, torch.Tensor]]:
        """token -> {embedding key: (count, width) on the CPU}."""
        out: dict[str, dict[str, torch.Tensor]] = {}
        offset = 0
        for spec in self.specs:
            out[spec.token] = {key: e.vectors.detach()[offset:offset + spec.count].cpu().to(dtype or torch.float32)
                               for key, e in zip(self.keys, self.embeddings)}
            offset += spec.count
        return out

    def bundle(self, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
        """The network file's bundle_emb.* tensors."""
        from networks.files import bundle_tensors

        out = {}
        for token, vectors in self.vectors(dtype).items():
            out.update(bundle_tensors(token, vectors))
        return out

    def write_files(self, network_file: Path, *, dtype: torch.dtype | None,
                    metadata: dict[str, str] | None) -> list[Path]:
        """Each embedding as its own file, `<network stem>-embeddings/<token>.safetensors` (the stem is the word
        A1111 and ComfyUI prompts use), in sd-scripts' layout: emb_params, or SDXL's clip_l/clip_g."""
        from library.formats import embedding_files as files

        folder = network_file.with_name(network_file.stem + "-embeddings")
        folder.mkdir(parents=True, exist_ok=True)
        metadata = {k: v for k, v in (metadata or {}).items() if not k.startswith(("ss_network", "sshs_"))}
        written = []
        for token, vectors in self.vectors().items():
            path = folder / f"{token}.safetensors"
            if len(vectors) > 1:
                written.append(files.save_sdxl(path, vectors, metadata=metadata, dtype=dtype))
            else:
                written.append(files.save_kohya(path, vectors["emb_params"], metadata=metadata, dtype=dtype))
        return written

    def describe(self) -> str:
        return ", ".join(f"'{s.token}' ({s.count} vector{'s' if s.count != 1 else ''})" for s in self.specs)


def check_captions_mention(specs: list[EmbeddingSpec], plan) -> None:
    """A token no training caption contains learns nothing: refuse before any weights load."""
    if plan is None:
        return
    entries = [e for d in plan.datasets for e in d.entries if not e.is_reg]
    texts = " ".join(" ".join(filter(None, (e.subset.caption_prefix, e.caption, e.subset.caption_suffix)))
                     for e in entries).lower()
    missing = [s.token for s in specs if s.token.lower() not in texts]
    if entries and missing:
        raise UserError(f"{FLAG}: no training caption contains '{missing[0]}', so its embedding would learn nothing: "
                        f"put the token in the captions (or the folder name's class tokens) or add --caption_prefix "
                        f"'{missing[0]}'")
