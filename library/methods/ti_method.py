"""What train_textual_inversion.py and sdxl_train_textual_inversion.py train: the vectors of a new token in each text
encoder's input embedding (SD 1.x/2.x: one; SDXL: clip_l and clip_g), everything else frozen (sd-scripts' rules)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from library.config.run_config import RunConfig
from library.data.plan import RunPlan
from library.errors import UserError
from library.methods.a1111_common import CheckpointIdentity, template_transform
from library.methods.diffusion_method import DiffusionMethod, freeze_models
from library.models.components import Components

EMBEDDING_FORMATS = {"pt": ".pt", "safetensors": ".safetensors", "diffusers": ""}


class NewTokenEmbedding(torch.nn.Module):
    """The text encoder's token embedding, with the rows of the new tokens read from a small trained tensor.

    sd-scripts resizes the whole matrix, trains it and copies the old rows back after every step; here the old
    rows never enter the optimizer, so they stay bit-identical whatever it does (weight decay included), and its
    state is (n, width) instead of (vocabulary, width)."""

    def __init__(self, base: torch.nn.Embedding, first_id: int, vectors: torch.Tensor):
        super().__init__()
        self.base = base
        self.first_id = first_id
        self.vectors = torch.nn.Parameter(vectors.detach().clone().float())

    @property
    def weight(self) -> torch.Tensor:
        """The full matrix, new rows included (what a resized embedding would hold; for readers of `.weight`)."""
        return torch.cat([self.base.weight, self.vectors.detach().to(self.base.weight.dtype)])

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        out = self.base(input_ids.clamp(max=self.first_id - 1))
        offset = (input_ids - self.first_id).clamp(0, self.vectors.shape[0] - 1)
        rows = self.vectors.to(out.dtype)[offset]
        return torch.where((input_ids >= self.first_id).unsqueeze(-1), rows, out)


class TokenExpandingEncoder:
    """Prompt encoding with the token written out as its N tokens ("tok" → "tok tok1 tok2"), as sd-scripts does for
    captions and sample prompts alike."""

    def __init__(self, encode, token: str, tokens: list[str]):
        self.encode, self.expanded = encode, " ".join(tokens)
        # CLIP lower-cases text before matching tokens, so "MyChar" in a caption is the token too.
        self.pattern = re.compile(re.escape(token), re.IGNORECASE) if len(tokens) > 1 else None

    def __call__(self, captions: list[str], **kwargs) -> torch.Tensor:
        return self.encode(self._expand(captions), **kwargs)

    def conditioning(self, captions: list[str], **kwargs):
        """kwargs (`weighted=`) go to the wrapped encoder."""
        from library.models.family import TextConditioning

        captions = self._expand(captions)
        inner = getattr(self.encode, "conditioning", None)
        return inner(captions, **kwargs) if inner is not None else TextConditioning(self.encode(captions, **kwargs))

    def _expand(self, captions: list[str]) -> list[str]:
        if self.pattern is None:
            return captions
        return [self.pattern.sub(lambda _: self.expanded, caption) for caption in captions]


class VectorsState:
    """What --save_state keeps of a textual inversion: the vectors only, not the frozen matrix around them (one such
    object per text encoder)."""

    def __init__(self, embedding: NewTokenEmbedding):
        self.embedding = embedding

    def state_dict(self) -> dict:
        return {"vectors": self.embedding.vectors.detach().cpu()}

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            self.embedding.vectors.copy_(state["vectors"])


@dataclass(frozen=True)
class _Start:
    """What --weights gives a run: each text encoder's vectors (in the family's embedding-key order) and the step."""

    vectors: tuple[torch.Tensor, ...]
    step: int


class TextualInversionMethod(DiffusionMethod):
    def __init__(self, config: RunConfig, parts: Components, device: torch.device, weight_dtype: torch.dtype,
                 plan: RunPlan | None = None):
        token = config.token_string
        if not token:
            raise UserError("--token_string is required: the new word the embedding is trained for "
                            "(e.g. --token_string mychar)")
        if config.output_dir and config.output_name:  # before any training, not after it
            suffix = EMBEDDING_FORMATS.get(config.save_model_as, "")
            _refuse_foreign(Path(config.output_dir) / f"{config.output_name}{suffix}")
        self.keys = parts.family.embedding_keys()  # SD 1.x/2.x: ("emb_params",); SDXL: ("clip_l", "clip_g")
        start = _resume_from(config, self.keys)
        count = _vector_count(config, start)
        self.tokens = [token] + [f"{token}{i}" for i in range(1, count)]
        # The same new tokens in every tokenizer, each encoder's rows initialised from the init word in that encoder.
        self.embeddings: list[NewTokenEmbedding] = []
        initial: list[torch.Tensor] = []
        for index, (text_encoder, tokenizer) in enumerate(zip(parts.text_encoders, parts.tokenizers)):
            base = text_encoder.get_input_embeddings()
            # Before the new tokens exist: an init word containing the token must read the base model's own rows.
            rows = start.vectors[index] if start is not None else None
            what = f"its {self.keys[index]} vectors" if len(self.keys) > 1 else "its vectors"
            vectors = initial_vectors(tokenizer, base.weight.detach(), count, init_word=config.init_word, start=rows,
                                      source=config.weights, what=what, say=index == 0)
            first_id = add_new_tokens(tokenizer, self.tokens, flag=f"--token_string {token}",
                                      fix="it has an embedding of its own; choose a made-up word (e.g. 'mychar')")
            initial.append(vectors)
            self.embeddings.append(NewTokenEmbedding(base, first_id, vectors))
            text_encoder.set_input_embeddings(self.embeddings[-1])
        self.step_offset = start.step if start is not None else 0
        freeze_models(parts, device, weight_dtype, no_half_vae=bool(config.no_half_vae))
        # The cast above rounded the vectors to the frozen models' dtype; they train in float32 from their source.
        for embedding, vectors in zip(self.embeddings, initial):
            embedding.vectors.data = vectors.detach().float().to(device)
            embedding.vectors.requires_grad_(True)
        super().__init__(config, parts, device, weight_dtype, plan, train_text_encoder=True)
        self.encode_prompts = TokenExpandingEncoder(self.encode_prompts, token, self.tokens)
        self.caption_transform = template_transform(config, name=token, require_name=True)
        if self.caption_transform is None and plan is not None:
            _check_captions_mention(token, plan)
        self.checkpoint = CheckpointIdentity(config.pretrained_model_name_or_path)
        if config.gradient_checkpointing:
            parts.unet.enable_gradient_checkpointing()
            for text_encoder in parts.text_encoders:
                text_encoder.gradient_checkpointing_enable()
        # Train mode for gradient checkpointing (diffusers/transformers only checkpoint then); CLIP has no dropout.
        for module in (parts.unet, *parts.text_encoders):
            module.train(bool(config.gradient_checkpointing))
        ids = ", ".join(f"{e.first_id}…{e.first_id + count - 1}" for e in self.embeddings)
        print(f"textual inversion: {count} vector(s) for '{token}' (token ids {ids}"
              + (f" in {' / '.join(self.keys)}" if len(self.keys) > 1 else "") + ")"
              + (f", continuing from step {self.step_offset}" if self.step_offset else ""))

    # ------------------------------------------------------------------ what trains
    def param_groups(self):
        # One group for every encoder's vectors, as sd-scripts (its trainable_params hold both embedding matrices).
        return [{"params": self.trainable_params(), "lr": self.config.learning_rate}], ["embedding"]

    def trainable_params(self) -> list[torch.nn.Parameter]:
        return [embedding.vectors for embedding in self.embeddings]

    def checkpoint_objects(self) -> list:
        return [VectorsState(embedding) for embedding in self.embeddings]

    @property
    def embedding(self) -> NewTokenEmbedding:
        """The one text encoder's embedding (SD 1.x/2.x); SDXL has one per encoder in `embeddings`."""
        return _only(self.embeddings, "embeddings")

    @property
    def vectors(self) -> torch.Tensor:
        """The trained vectors of the one text encoder (SD 1.x/2.x); SDXL: `vectors_by_key`."""
        return self.embedding.vectors.detach()

    @property
    def vectors_by_key(self) -> dict[str, torch.Tensor]:
        """Each text encoder's trained vectors under its file key ("emb_params"; "clip_l", "clip_g")."""
        return {key: embedding.vectors.detach() for key, embedding in zip(self.keys, self.embeddings)}

    # ------------------------------------------------------------------ saving
    def export(self, path: Path, *, dtype: torch.dtype | None, metadata: dict[str, str] | None, global_step: int = 0,
               check: bool = True, **_) -> Path:
        written = self._write(path, dtype=dtype, metadata=metadata, global_step=global_step)
        if check:  # export self-test: the file as the readers read it, against this model's encoder widths
            from library.formats.reader_check import embedding_readers, report

            print("\n".join(report(f"saved {Path(written).name}", *embedding_readers(Path(written), self.parts))))
        return written

    def _write(self, path: Path, *, dtype: torch.dtype | None, metadata: dict[str, str] | None,
               global_step: int) -> Path:
        from library.formats import embedding_files as files

        _refuse_foreign(path)
        dtype = dtype or torch.float32
        step = self.step_offset + global_step
        fmt = self.config.save_model_as
        if len(self.embeddings) > 1:
            vectors = {key: v.cpu() for key, v in self.vectors_by_key.items()}
            metadata = _embedding_metadata(metadata, step)
            if fmt == "diffusers":
                return files.save_sdxl_diffusers(path, vectors, token=self.tokens[0], metadata=metadata, dtype=dtype)
            return files.save_sdxl(path, vectors, metadata=metadata, dtype=dtype)
        vectors = self.vectors.cpu()
        if fmt == "pt":
            return files.save_a1111(path, vectors, name=self.tokens[0], step=step,
                                    sd_checkpoint=self.checkpoint.shorthash_from(metadata),
                                    sd_checkpoint_name=self.checkpoint.name, dtype=dtype)
        metadata = _embedding_metadata(metadata, step)
        if fmt == "diffusers":
            return files.save_diffusers(path, vectors, token=self.tokens[0], metadata=metadata, dtype=dtype)
        return files.save_kohya(path, vectors, metadata=metadata, dtype=dtype)


def _only(values: list, what: str):
    if len(values) != 1:
        raise AttributeError(f"this model has {len(values)} text encoders: use the per-encoder {what}")
    return values[0]


def _embedding_metadata(metadata: dict[str, str] | None, step: int) -> dict[str, str]:
    """The run's ss_* keys with a textual-inversion modelspec (sd-scripts: architecture + "/textual-inversion")."""
    from library.formats.modelspec import IMPL_STABILITY_AI

    out = dict(metadata or {})
    out["ss_steps"] = str(step)  # the embedding's own count, which --weights continues from
    arch = out.get("modelspec.architecture")
    if arch:
        out["modelspec.architecture"] = arch.rsplit("/", 1)[0] + "/textual-inversion"
        out["modelspec.implementation"] = IMPL_STABILITY_AI
    return {k: v for k, v in out.items() if not k.startswith("ss_network")}


def _resume_from(config: RunConfig, keys: tuple[str, ...]) -> _Start | None:
    if not config.weights:
        return None
    from library.formats.embedding_files import SDXL_KEYS, load_embedding, load_sdxl_embedding

    if tuple(keys) == SDXL_KEYS:
        loaded = load_sdxl_embedding(config.weights)
        return _Start(tuple(loaded.vectors[key] for key in keys), loaded.step)
    loaded = load_embedding(config.weights)
    return _Start((loaded.vectors,), loaded.step)


def _vector_count(config: RunConfig, start: _Start | None) -> int:
    count = config.num_vectors_per_token or 1
    if count < 1:
        raise UserError(f"--num_vectors_per_token {count}: give 1 or more")
    held = start.vectors[0].shape[0] if start is not None else count
    if held == count:
        return count
    if config.is_set("num_vectors_per_token"):
        raise UserError(f"--weights {config.weights} holds {held} vectors but "
                        f"--num_vectors_per_token is {count}: set it to {held} or leave it out")
    return held


def add_new_tokens(tokenizer, tokens: list[str], *, flag: str, fix: str) -> int:
    """Add tokens the tokenizer does not know yet (sd-scripts' rule) and return the first one's id: NewTokenEmbedding
    reads their rows consecutively from there."""
    vocab = tokenizer.get_vocab()
    clash = next((t for t in tokens if t in vocab or tokens.count(t) > 1), None)
    if clash is not None or tokenizer.add_tokens(tokens) != len(tokens):
        raise UserError(f"{flag}: '{clash or tokens[0]}' is already a token of the tokenizer; {fix}")
    ids = tokenizer.convert_tokens_to_ids(tokens)
    if ids != list(range(ids[0], ids[0] + len(tokens))):
        raise UserError(f"{flag}: the tokenizer gave ids {ids}, not consecutive ones; use the bundled tokenizer "
                        "(leave out --tokenizer)")
    return ids[0]


def initial_vectors(tokenizer, weight: torch.Tensor, count: int, *, init_word: str | None = None,
                    start: torch.Tensor | None = None, source: str | None = None, what: str = "its vectors",
                    flag: str = "--init_word", say: bool = True) -> torch.Tensor:
    """`count` starting rows for new tokens: `start` (vectors read from `source`, a --weights file), else the init
    words' rows cycled, else rows around the mean of the embedding matrix `weight`. `flag` names the init words in
    messages (--init_word; pivotal tuning's --train_embeddings TOKEN)."""
    if start is not None:
        if start.shape[1] != weight.shape[1]:
            raise UserError(f"--weights {source}: {what} are {start.shape[1]} wide, this text encoder's are "
                            f"{weight.shape[1]} (an embedding for another model family)")
        return start.float()
    if init_word:
        # Ids of the words' tokens, cycled over the vectors (sd-scripts); the base tokenizer knows none of ours.
        ids = tokenizer.encode(init_word, add_special_tokens=False)
        if not ids:
            raise UserError(f"{flag} '{init_word}' gives no tokens; use one or more words")
        if len(ids) > count and say:  # once, not once per text encoder
            print(f"{flag} '{init_word}' is {len(ids)} tokens; the first {count} initialise the vectors")
        return torch.stack([weight[ids[i % len(ids)]].float() for i in range(count)])
    return _mean_resized(weight.float(), count)


def _mean_resized(weight: torch.Tensor, count: int) -> torch.Tensor:
    """New rows as transformers' `resize_token_embeddings` makes them now (what sd-scripts gets without
    --init_word): drawn around the mean of all rows with 1e-5 × their covariance; the mean if that fails."""
    mean = weight.mean(0)
    centered = weight - mean
    covariance = centered.T @ centered / weight.shape[0]
    try:
        dist = torch.distributions.MultivariateNormal(mean, covariance_matrix=1e-5 * covariance)
        return dist.sample((count,))
    except ValueError:
        return mean.expand(count, -1).clone()


def _check_captions_mention(token: str, plan: RunPlan) -> None:
    """Captions without the token train nothing: say so before any weights load rather than after hours."""
    entries = [e for d in plan.datasets for e in d.entries if not e.is_reg]
    texts = [" ".join(filter(None, (e.subset.caption_prefix, e.caption, e.subset.caption_suffix))) for e in entries]
    if entries and not any(token.lower() in text.lower() for text in texts):  # CLIP lower-cases text
        raise UserError(f"no training caption contains '{token}', so the embedding would learn nothing: put the token "
                        f"in the captions (or the folder name's class tokens), add --caption_prefix '{token}', or "
                        "use --use_object_template / --use_style_template / --ti_template_file")


def _refuse_foreign(path: Path) -> None:
    from library.formats.embedding_files import is_any_embedding_file, refuse_foreign_folder

    if path.is_dir():
        refuse_foreign_folder(path)  # a diffusers embedding folder is replaced whole: nothing else may be in it
    if path.exists() and not is_any_embedding_file(path):
        raise UserError(f"{path}: already exists and is not a textual-inversion embedding; refusing to overwrite it, "
                        "choose another --output_name or --output_dir")
