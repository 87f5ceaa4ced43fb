"""networks.svd: best low-rank factorisations, clipping, retained norms and sd-scripts' dynamic rank rules."""

from __future__ import annotations

import pytest
import torch

from library.errors import UserError
from networks.svd import dynamic_rank, fro_retained, low_rank, svd_of_product


def _rank_r(out_dim, in_dim, r, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(out_dim, r, generator=generator) @ torch.randn(r, in_dim, generator=generator)


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def test_exact_rank_matrix_is_reproduced_and_fully_retained():
    delta = _rank_r(20, 12, 3)
    up, down, retained = low_rank(delta, 3)
    assert up.shape == (20, 3) and down.shape == (3, 12)
    assert _rel(up @ down, delta) < 1e-5 and retained == pytest.approx(1.0)
    # singular values go to the up side: down has orthonormal rows
    assert torch.allclose(down @ down.T, torch.eye(3), atol=1e-5)


def test_truncation_is_the_eckart_young_optimum():
    delta = torch.randn(16, 10, generator=torch.Generator().manual_seed(1))
    S = torch.linalg.svdvals(delta)
    up, down, retained = low_rank(delta, 4)
    assert float((delta - up @ down).norm()) == pytest.approx(float(S[4:].pow(2).sum().sqrt()), rel=1e-4)
    assert retained == pytest.approx(fro_retained(S, 4)) and 0 < retained < 1


def test_rank_is_capped_by_the_matrix_size():
    up, down, retained = low_rank(torch.randn(5, 3), 8)
    assert up.shape == (5, 3) and down.shape == (3, 3) and retained == pytest.approx(1.0)


def test_conv_kernel_is_flattened_and_shaped_like_locon():
    generator = torch.Generator().manual_seed(2)
    delta = torch.einsum("or,rikl->oikl", torch.randn(8, 2, generator=generator),
                         torch.randn(2, 4, 3, 3, generator=generator))
    up, down, retained = low_rank(delta, 2)
    assert up.shape == (8, 2, 1, 1) and down.shape == (2, 4, 3, 3)
    assert _rel(torch.einsum("or,rikl->oikl", up.flatten(1), down), delta) < 1e-5


def test_clamp_quantile_clips_both_factors_at_one_symmetric_bound_and_one_means_none():
    delta = _rank_r(40, 30, 4, seed=3)
    up, down, _ = low_rank(delta, 4)
    limit = float(torch.quantile(torch.cat([up.flatten(), down.flatten()]).abs(), 0.9))
    clipped_up, clipped_down, _ = low_rank(delta, 4, clamp_quantile=0.9)
    assert torch.allclose(clipped_up, up.clamp(-limit, limit))
    assert torch.allclose(clipped_down, down.clamp(-limit, limit))
    assert float(clipped_up.abs().max()) == pytest.approx(limit)
    unclipped = low_rank(delta, 4, clamp_quantile=1.0)
    assert torch.equal(unclipped[0], up) and _rel(unclipped[0] @ unclipped[1], delta) < 1e-5


def test_svd_of_product_matches_a_direct_svd():
    generator = torch.Generator().manual_seed(4)
    up, down = torch.randn(30, 5, generator=generator), torch.randn(5, 18, generator=generator)
    U, S, Vh = svd_of_product(up, down)
    assert torch.allclose(S, torch.linalg.svdvals(up @ down)[:5], rtol=1e-4)
    assert _rel((U * S) @ Vh, up @ down) < 1e-5


S = torch.tensor([8.0, 4.0, 2.0, 1.0, 0.5])


@pytest.mark.parametrize("method, param, expected", [
    ("sv_ratio", 3.0, 2),        # keep S > 8/3: 8, 4
    ("sv_ratio", 1000.0, 5),
    ("sv_ratio", 1.0, 1),        # nothing is above S[0] itself: at least one rank
    ("sv_cumulative", 0.7, 2),   # cumulative S shares: .516, .774, ...
    ("sv_cumulative", 0.999, 5),
    ("sv_fro", 0.9, 2),          # cumulative S² shares: .753, .941, ...; target 0.9² = .81
    ("sv_fro", 0.8, 1),          # .753 >= 0.8² = .64
])
def test_dynamic_rank_rules(method, param, expected):
    assert dynamic_rank(S, method, param) == expected


def test_dynamic_rank_bounds_and_zero_matrix():
    assert dynamic_rank(torch.zeros(4), "sv_fro", 0.9) == 1
    assert dynamic_rank(S, "sv_fro", 2.0) == len(S)  # unreachable target: all of them, never more
    with pytest.raises(UserError, match="sv_ratio"):
        dynamic_rank(S, "sv_magic", 1.0)
