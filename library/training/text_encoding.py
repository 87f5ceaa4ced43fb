"""Prompt tokenisation and CLIP text encoding for SD 1.x/2.x, computing what sd-scripts' strategy_sd computes; the
SD families' `prompt_encoder` is a `PromptEncoder`."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch
from transformers import CLIPTextModel, CLIPTokenizer

from library.errors import UserError
from library.models.family import TextConditioning
from library.models.tokenizer import MODEL_MAX_LENGTH

# Tokens between <BOS> and <EOS> in one 77-token CLIP window; --max_token_length counts these.
CHUNK_TOKENS = MODEL_MAX_LENGTH - 2
ALLOWED_MAX_TOKEN_LENGTHS = (None, 75, 150, 225)
# Values of each parameter hashed into encoder_identity: enough to tell two models apart, cheap for a 123M model.
FINGERPRINT_VALUES = 16


def chunk_count(max_token_length: int | None) -> int:
    """77-token windows per caption: 1 for None/75, 2 for 150, 3 for 225; anything else is a UserError."""
    if max_token_length not in ALLOWED_MAX_TOKEN_LENGTHS:
        raise UserError(f"--max_token_length must be 75 (None), 150 or 225, got {max_token_length!r}; "
                        "set it to one of those or leave it out")
    return 1 if max_token_length is None else max_token_length // CHUNK_TOKENS


def tokenize(tokenizer: CLIPTokenizer, captions: Sequence[str], *, max_token_length: int | None) -> torch.LongTensor:
    """Token ids (B, n_chunks, 77) as sd-scripts' `SdTokenizeStrategy.tokenize` / `_get_input_ids` make them.

    No version flag: like sd-scripts we read the padding rule off the tokenizer itself (`pad_token_id ==
    eos_token_id` is SD 1.x), so an SD 2.x model given an EOS-padding tokenizer is treated as SD 1.x there too.
    """
    n = chunk_count(max_token_length)
    if not captions:
        return torch.empty((0, n, MODEL_MAX_LENGTH), dtype=torch.long)
    # sd-scripts tokenizes one caption at a time; padding to a fixed max_length makes a batched call identical.
    ids = tokenizer(list(captions), padding="max_length", truncation=True, max_length=n * CHUNK_TOKENS + 2,
                    return_tensors="pt").input_ids
    if n == 1:
        return ids.unsqueeze(1)
    return _split_into_chunks(ids, n, eos=tokenizer.eos_token_id, pad=tokenizer.pad_token_id)


def _split_into_chunks(ids: torch.Tensor, n: int, *, eos: int, pad: int) -> torch.Tensor:
    """(B, 75n+2) -> (B, n, 77): every chunk is the caption's first id, 75 ids, then the caption's LAST id."""
    b = ids.shape[0]
    body = ids[:, 1:-1].reshape(b, n, CHUNK_TOKENS)
    first = ids[:, None, :1].expand(b, n, 1)
    # sd-scripts closes every chunk with input_ids[-1] (EOS, or PAD on v2), not with the id after the chunk.
    last = ids[:, None, -1:].expand(b, n, 1)
    chunks = torch.cat([first, body, last], dim=2)
    if pad == eos:
        return chunks  # SD 1.x: "<BOS> ... <EOS>" windows, later empty windows are all <EOS>
    # SD 2.x fixups of `_get_input_ids`. A real "!" (id 0 = PAD) is indistinguishable from padding, as there.
    # A window whose content runs to its end gets <EOS> in place of the PAD it was closed with.
    penultimate = chunks[..., -2]
    runs_to_end = (penultimate != eos) & (penultimate != pad)
    chunks[..., -1] = torch.where(runs_to_end, eos, chunks[..., -1])
    # An empty window "<BOS> <PAD> ..." becomes "<BOS> <EOS> <PAD> ...".
    chunks[..., 1] = torch.where(chunks[..., 1] == pad, eos, chunks[..., 1])
    return chunks


def encode(text_encoder: CLIPTextModel, input_ids: torch.Tensor, *, clip_skip: int | None,
           max_token_length: int | None) -> torch.Tensor:
    """Hidden states (B, 77 or 75n+2, width) as sd-scripts' `SdTextEncodingStrategy.encode_tokens` returns them.

    No version flag: sd-scripts' v2 branch only adds a copy guarded by `tokens[j, 1] == tokenizer.eos_token`,
    a tensor compared with a *string*, which is always False, so both versions join chunks the same way.
    The result keeps the text encoder's dtype; gradients flow when the caller enables them.
    """
    n = chunk_count(max_token_length)
    if input_ids.ndim != 3 or tuple(input_ids.shape[1:]) != (n, MODEL_MAX_LENGTH):
        raise ValueError(f"input_ids of shape {tuple(input_ids.shape)} do not match max_token_length "
                         f"{max_token_length} (expected (B, {n}, {MODEL_MAX_LENGTH}))")
    b = input_ids.shape[0]
    # non_blocking: the host does not wait for the device to take the ids (a pageable copy is staged first)
    flat = input_ids.reshape(-1, MODEL_MAX_LENGTH).to(text_encoder.device, non_blocking=True)
    return join_windows(_hidden_states(text_encoder, flat, clip_skip).reshape(b, n, MODEL_MAX_LENGTH, -1))


def join_windows(hidden: torch.Tensor) -> torch.Tensor:
    """(B, n, 77, C) window states -> (B, 77 or 75n+2, C), as sd-scripts joins them.

    "<BOS> a <EOS> <BOS> b <EOS> ..." -> "<BOS> a b ... <EOS>": the first window's BOS, each window's 75 inner states,
    and the last window's final state (EOS or PAD). 150 -> 152 states, 225 -> 227.
    """
    b, n = hidden.shape[:2]
    if n == 1:
        return hidden[:, 0]
    inner = hidden[:, :, 1:-1].reshape(b, n * CHUNK_TOKENS, hidden.shape[-1])
    return torch.cat([hidden[:, 0, :1], inner, hidden[:, -1, -1:]], dim=1)


def _hidden_states(text_encoder: CLIPTextModel, flat_ids: torch.Tensor, clip_skip: int | None) -> torch.Tensor:
    if clip_skip is None:
        return text_encoder(flat_ids)[0]  # last_hidden_state: final_layer_norm already applied
    check_clip_skip(clip_skip, text_encoder)
    out = text_encoder(flat_ids, output_hidden_states=True, return_dict=True)
    # transformers 4 wraps the modules in `text_model`; transformers 5 does not.
    final_layer_norm = getattr(text_encoder, "text_model", text_encoder).final_layer_norm
    # hidden_states[-n] is the output of layer L-n+1 before the final norm, which sd-scripts then applies.
    return final_layer_norm(out.hidden_states[-clip_skip])


def check_clip_skip(clip_skip: int | None, text_encoder: CLIPTextModel) -> None:
    """sd-scripts indexes hidden_states[-clip_skip] unchecked: 0 would silently pick the embeddings; we refuse."""
    layers = text_encoder.config.num_hidden_layers
    if clip_skip is not None and not 1 <= clip_skip <= layers:
        raise UserError(f"--clip_skip must be between 1 and {layers} (the text encoder's layer count), "
                        f"got {clip_skip}; use 1 (or leave it out) for the last layer, 2 for the penultimate")


class PromptEncoder:
    """captions -> conditioning tensor for one model and one (clip_skip, max_token_length) setting."""

    def __init__(self, tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel, *, clip_skip: int | None,
                 max_token_length: int | None, source: str | None = None, weighted: bool = False) -> None:
        # Bad values fail here, before any training starts.
        chunk_count(max_token_length)
        check_clip_skip(clip_skip, text_encoder)
        self.tokenizer, self.text_encoder = tokenizer, text_encoder
        self.clip_skip, self.max_token_length = clip_skip, max_token_length
        # --weighted_captions: "(word:1.2)" scales that word's hidden states (library.training.prompt_weights)
        self.weighted = weighted
        self.source = source or text_encoder.config.name_or_path or "unnamed"

    def tokenize(self, captions: Sequence[str]) -> torch.Tensor:
        """Ids (B, n, 77); each distinct caption is tokenized once (caption dropout makes many "")."""
        unique = list(dict.fromkeys(captions))
        ids = tokenize(self.tokenizer, unique, max_token_length=self.max_token_length)
        row = {caption: i for i, caption in enumerate(unique)}
        return ids[torch.tensor([row[c] for c in captions], dtype=torch.long)]

    def __call__(self, captions: Sequence[str], *, weighted: bool | None = None) -> torch.Tensor:
        """Hidden states; `weighted` (default: as constructed) reads the prompt-weight syntax."""
        if not (self.weighted if weighted is None else weighted):
            # The whole batch is encoded, duplicates included, as sd-scripts does: same shapes, same numerics.
            return encode(self.text_encoder, self.tokenize(captions), clip_skip=self.clip_skip,
                          max_token_length=self.max_token_length)
        from library.training.prompt_weights import apply_weights, tokenize_weighted  # it builds on this module

        ids, weights = tokenize_weighted(self.tokenizer, captions, max_token_length=self.max_token_length)
        hidden = encode(self.text_encoder, ids, clip_skip=self.clip_skip, max_token_length=self.max_token_length)
        return apply_weights(hidden, weights)

    def conditioning(self, captions: Sequence[str], *, weighted: bool | None = None) -> TextConditioning:
        """What the UNet takes from the text: SD 1.x/2.x have hidden states only (no pooled output)."""
        return TextConditioning(self(captions, weighted=weighted))

    def unpadded(self, captions: Sequence[str]) -> TextConditioning:
        """--no_token_padding (train_db.py): the batch padded only to its longest caption, one window of at most 77
        tokens whatever --max_token_length says, as sd-scripts' DreamBooth dataset tokenized it (padding=True). Unlike
        sd-scripts, whose shortcut for such ids skipped the layer choice, --clip_skip applies."""
        ids = self.tokenizer(list(captions), padding=True, truncation=True, max_length=MODEL_MAX_LENGTH,
                             return_tensors="pt").input_ids
        ids = ids.to(self.text_encoder.device, non_blocking=True)
        return TextConditioning(_hidden_states(self.text_encoder, ids, self.clip_skip))

    def encoder_identity(self) -> str:
        """Everything the outputs depend on besides the caption, for the text-encoder-output cache key."""
        n = chunk_count(self.max_token_length)
        parts = [
            f"source={self.source}",
            # The source name alone would let a file overwritten with another model reuse stale outputs.
            f"weights={weights_fingerprint(self.text_encoder)}",
            f"tokenizer=vocab{len(self.tokenizer)}-pad{self.tokenizer.pad_token_id}",
            f"clip_skip={self.clip_skip or 1}",  # None and 1 give identical states
            f"max_token_length={n * CHUNK_TOKENS}",  # None and 75 give identical states
            f"dtype={str(self.text_encoder.dtype).removeprefix('torch.')}",
        ]
        if self.weighted:
            parts.append("weighted=1")  # only then: the keys of unweighted caches stay what they were
        return ";".join(parts)



def weights_fingerprint(module: torch.nn.Module, length: int = 16) -> str:
    """A digest of every tensor's name and first values: tells two models apart cheaply (a cache key part), so a
    file overwritten with another model does not reuse stale outputs."""
    digest = hashlib.sha256()
    for name, param in module.state_dict().items():
        head = param.detach().flatten()[:FINGERPRINT_VALUES].float().cpu()
        digest.update(name.encode())
        digest.update(head.numpy().tobytes())
    return digest.hexdigest()[:length]
