"""Attention weights in prompts, AUTOMATIC1111's syntax as sd-scripts reads it (`--weighted_captions`, sample prompts).

`(word)` multiplies the weight of what it encloses by 1.1, `[word]` divides it by 1.1, `(word:1.3)` multiplies it by
1.3; brackets nest, unclosed ones apply to the end, `\\(` `\\)` `\\[` `\\]` `\\\\` are literal characters. After the text
encoder runs, each token's hidden state is multiplied by its weight (sd-scripts' strategy_base / strategy_sd: no
renormalisation of the mean, and the pooled output of SDXL's second encoder is not weighted).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch

from library.models.tokenizer import MODEL_MAX_LENGTH
from library.training.text_encoding import CHUNK_TOKENS, _split_into_chunks, chunk_count

ROUND_MULTIPLIER = 1.1
SQUARE_MULTIPLIER = 1 / 1.1

_ATTENTION = re.compile(r"""
\\\(|
\\\)|
\\\[|
\\]|
\\\\|
\\|
\(|
\[|
:([+-]?[.\d]+)\)|
\)|
]|
[^\\()\[\]:]+|
:
""", re.X)


def parse_attention(text: str) -> list[tuple[str, float]]:
    """`text` as (piece, weight) runs: 'a (b:1.5) c' -> [('a ', 1.0), ('b', 1.5), (' c', 1.0)]; runs of equal
    weight are joined, and an empty text is [('', 1.0)]."""
    pieces: list[list] = []
    round_open: list[int] = []
    square_open: list[int] = []

    def scale_from(start: int, factor: float) -> None:
        for piece in pieces[start:]:
            piece[1] *= factor

    for match in _ATTENTION.finditer(text):
        token, weight = match.group(0), match.group(1)
        if token.startswith("\\"):
            pieces.append([token[1:], 1.0])
        elif token == "(":
            round_open.append(len(pieces))
        elif token == "[":
            square_open.append(len(pieces))
        elif weight is not None and round_open:
            scale_from(round_open.pop(), float(weight))
        elif token == ")" and round_open:
            scale_from(round_open.pop(), ROUND_MULTIPLIER)
        elif token == "]" and square_open:
            scale_from(square_open.pop(), SQUARE_MULTIPLIER)
        else:
            pieces.append([token, 1.0])
    for start in round_open:
        scale_from(start, ROUND_MULTIPLIER)
    for start in square_open:
        scale_from(start, SQUARE_MULTIPLIER)
    joined: list[list] = []
    for piece in pieces or [["", 1.0]]:
        if joined and joined[-1][1] == piece[1]:
            joined[-1][0] += piece[0]
        else:
            joined.append(piece)
    return [(piece, weight) for piece, weight in joined]


def has_weights(text: str) -> bool:
    """Whether `text` reads differently with the syntax than without it (brackets or escapes that do something)."""
    return parse_attention(text) != [(text, 1.0)]


def tokenize_weighted(tokenizer, captions: Sequence[str], *, max_token_length: int | None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Ids and weights, both (B, n, 77), as sd-scripts' `tokenize_with_weights`: each piece is tokenized on its own
    (so a piece boundary is a token boundary), the tokens cut to 75n, then laid out as `tokenize` lays out ids; BOS,
    EOS and padding weigh 1."""
    n = chunk_count(max_token_length)
    length = n * CHUNK_TOKENS
    rows, weight_rows = [], []
    for caption in captions:
        ids: list[int] = []
        weights: list[float] = []
        for piece, weight in parse_attention(caption):
            piece_ids = tokenizer(piece).input_ids[1:-1]
            ids += piece_ids
            weights += [weight] * len(piece_ids)
            if len(ids) > length:
                break
        ids, weights = ids[:length], weights[:length]
        padding = length - len(ids)
        rows.append([tokenizer.bos_token_id, *ids, tokenizer.eos_token_id] + [tokenizer.pad_token_id] * padding)
        weight_rows.append([1.0, *weights] + [1.0] * (padding + 1))
    ids = torch.tensor(rows, dtype=torch.long).reshape(len(captions), length + 2)
    weights = torch.tensor(weight_rows, dtype=torch.float32).reshape(len(captions), length + 2)
    if n == 1:
        return ids.unsqueeze(1), weights.unsqueeze(1)
    ids = _split_into_chunks(ids, n, eos=tokenizer.eos_token_id, pad=tokenizer.pad_token_id)
    chunk_weights = torch.ones(len(captions), n, MODEL_MAX_LENGTH)
    chunk_weights[:, :, 1:-1] = weights[:, 1:-1].reshape(len(captions), n, CHUNK_TOKENS)
    return ids, chunk_weights


def apply_weights(hidden: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Hidden states (B, 77 or 75n+2, C) times per-token weights (B, n, 77) from `tokenize_weighted`: all 77 states
    with one window; with several, the 75 inner states of each (the joined BOS and final state are not weighted)."""
    weights = weights.to(device=hidden.device, dtype=hidden.dtype)
    if weights.shape[1] == 1:
        return hidden * weights[:, 0].unsqueeze(-1)
    inner = weights[:, :, 1:-1].reshape(weights.shape[0], -1)
    ones = torch.ones_like(inner[:, :1])
    return hidden * torch.cat([ones, inner, ones], dim=1).unsqueeze(-1)
