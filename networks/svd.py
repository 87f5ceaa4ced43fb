"""Low-rank maths for LoRA extraction and resizing: truncated SVD of a weight delta and sd-scripts' dynamic ranks."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from library.errors import UserError

DYNAMIC_METHODS = ("sv_ratio", "sv_fro", "sv_cumulative")
MIN_SV = 1e-6  # sd-scripts: a delta whose largest singular value is below this is treated as zero (rank 1)


def as_matrix(delta: torch.Tensor) -> torch.Tensor:
    """A Linear (out × in) or Conv2d (out × in × k × k) delta as the out × in·k·k matrix it multiplies by."""
    if delta.dim() not in (2, 4):
        raise ValueError(f"expected a 2-D or 4-D weight, got shape {tuple(delta.shape)}")
    return delta.reshape(delta.shape[0], -1).float()


def singular_values(delta: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svdvals(as_matrix(delta))


def fro_retained(S: torch.Tensor, rank: int) -> float:
    """Frobenius norm of the best rank-`rank` part over that of the whole: sqrt(Σ kept S² / Σ S²); 1.0 for zero."""
    total = float(S.float().pow(2).sum())
    if total == 0.0:
        return 1.0
    return (float(S[:rank].float().pow(2).sum()) / total) ** 0.5


def low_rank(delta: torch.Tensor, rank: int, *, clamp_quantile: float | None = None,
             ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(up, down, retained): the best rank-r factorisation up·down of `delta` (Eckart–Young), computed in float32.

    As sd-scripts does, all singular values go to the up side (up = U·diag(S), down = Vh), so `down` has
    orthonormal rows. Shapes follow LoRA/LoCon: Linear up (out, r), down (r, in); Conv2d up (out, r, 1, 1),
    down (r, in, k, k). The rank is capped at min(out, in·k·k).
    """
    U, S, Vh = torch.linalg.svd(as_matrix(delta), full_matrices=False)
    return truncate(U, S, Vh, rank, delta.shape, clamp_quantile=clamp_quantile)


def svd_of_product(up: torch.Tensor, down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD of up·down (flattened to matrices) without forming it: QR of both factors, then an r × r SVD.

    A LoRA delta has rank ≤ r, so this is exact and costs O((out + in)·r²) instead of a full out × in SVD.
    """
    up, down = up.reshape(up.shape[0], -1).float(), down.reshape(down.shape[0], -1).float()
    q_up, r_up = torch.linalg.qr(up)
    q_down, r_down = torch.linalg.qr(down.T)
    u_small, S, vh_small = torch.linalg.svd(r_up @ r_down.T)
    return q_up @ u_small, S, vh_small @ q_down.T


def truncate(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, rank: int, shape, *,
             clamp_quantile: float | None = None) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(up, down, retained) from an SVD of a delta of `shape`, keeping `rank` values (see low_rank)."""
    rank = max(1, min(int(rank), len(S)))
    up, down = U[:, :rank] * S[:rank], Vh[:rank]
    if clamp_quantile is not None and clamp_quantile < 1.0:
        up, down = _clamp(up, down, clamp_quantile)
    retained = fro_retained(S, rank)
    if len(shape) == 4:
        up = up.reshape(shape[0], rank, 1, 1)
        down = down.reshape(rank, *shape[1:])
    return up.contiguous(), down.contiguous(), retained


def _clamp(up: torch.Tensor, down: torch.Tensor, quantile: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Clip outliers to ±(quantile of |values| of both factors together).

    sd-scripts takes the quantile of the signed values and mirrors it, so even 1.0 can clip the negative tail;
    the quantile of |values| keeps the clip symmetric and makes 1.0 mean "no clipping".
    """
    values = torch.cat([up.flatten(), down.flatten()]).abs()
    if values.numel() > 1 << 24:  # torch.quantile's input limit; a strided sample estimates it well
        values = values[:: values.numel() // (1 << 24) + 1]
    limit = float(torch.quantile(values, quantile))
    return up.clamp(-limit, limit), down.clamp(-limit, limit)


def dynamic_rank(S: torch.Tensor, method: str, param: float) -> int:
    """sd-scripts' resize_lora rank rules on descending singular values S, clipped to 1..len(S).

    sv_ratio: keep values > S[0]/param. sv_fro: the smallest rank whose cumulative S² fraction reaches param².
    sv_cumulative: the smallest rank whose cumulative S fraction reaches param.
    """
    S = S.float()
    if method not in DYNAMIC_METHODS:
        raise UserError(f"--dynamic_method {method}: unknown; use one of {', '.join(DYNAMIC_METHODS)}")
    if len(S) == 0 or float(S[0]) <= MIN_SV:
        return 1
    if method == "sv_ratio":
        rank = int((S > S[0] / param).sum())
    elif method == "sv_fro":
        rank = _first_reaching(S.pow(2), param ** 2)
    else:
        rank = _first_reaching(S, param)
    return max(1, min(rank, len(S)))


def _first_reaching(values: torch.Tensor, target: float) -> int:
    """How many leading values it takes for their share of the total to reach `target` (searchsorted, left)."""
    shares = torch.cumsum(values, dim=0) / values.sum()
    return int(torch.searchsorted(shares, torch.tensor(float(target)))) + 1


@dataclass(frozen=True)
class Factorised:
    name: str
    rank: int
    retained: float  # Frobenius norm of the kept part over that of the whole ΔW


def lora_from_deltas(deltas: dict[str, torch.Tensor], rank: int, conv_rank: int | None = None, *,
                     clamp_quantile: float | None = None, device: str = "cpu"):
    """(kohya LoRA tensors, report): each ΔW as up·down of rank ≤ `rank` (`conv_rank` for 3×3 kernels), alpha = the
    rank kept, so the scale alpha/rank is 1 and up·down is the approximation itself."""
    weights, report = {}, []
    with torch.no_grad():
        for name, delta in deltas.items():
            is_kernel = delta.dim() == 4 and delta.shape[2:] != (1, 1)
            up, down, retained = low_rank(delta.to(device), conv_rank if is_kernel and conv_rank else rank,
                                          clamp_quantile=clamp_quantile)
            kept = down.shape[0]
            weights[f"{name}.lora_up.weight"] = up.cpu()
            weights[f"{name}.lora_down.weight"] = down.cpu()
            weights[f"{name}.alpha"] = torch.tensor(float(kept))
            report.append(Factorised(name, kept, retained))
    return weights, report
