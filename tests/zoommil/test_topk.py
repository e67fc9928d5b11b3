"""The perturbed top-K (Cordonnier 2021) that ZoomMIL selects patches with: its forward is the mean of the draws'
one-hots, its gradient is the gradient of the smoothed objective, and its edge cases (tiny sigma, K >= N, K = 0,
evaluation, shapes) behave."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from napari_wsimil.zoommil.topk import PerturbedTopKFunction, hard_topk_indices, perturbed_topk


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _draw_one_hots(x: torch.Tensor, k: int, s: int, sigma: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The documented draw, redone independently: Z ~ randn((B, S, N)) from the seed, sorted top-K one-hots."""
    z = torch.randn((x.shape[0], s, x.shape[1]), generator=_gen(seed), dtype=x.dtype)
    idx = torch.topk(x[:, None, :] + sigma * z, k, dim=-1).indices.sort(dim=-1).values
    return F.one_hot(idx, x.shape[1]).to(x.dtype), z            # (B, S, K, N), (B, S, N)


def test_forward_is_the_mean_of_the_draws_one_hots() -> None:
    x = torch.softmax(torch.randn(3, 9, generator=_gen(0)), dim=-1)
    out = perturbed_topk(x, 4, num_samples=64, sigma=0.05, generator=_gen(7))
    one_hots, _ = _draw_one_hots(x, 4, 64, 0.05, seed=7)
    assert out.shape == (3, 4, 9)
    torch.testing.assert_close(out, one_hots.mean(dim=1), rtol=0, atol=1e-6)
    torch.testing.assert_close(out.sum(dim=-1), torch.ones(3, 4))            # each row is a distribution over patches
    # rows follow the patch order: the expected patch index of row k increases with k
    centre = (out * torch.arange(9.0)).sum(-1)
    assert bool((centre[:, 1:] > centre[:, :-1]).all())


def test_efficient_backward_equals_the_materialised_reference_formula() -> None:
    """The reordered sum in backward is the reference's (B, K, N, N) expected Jacobian contracted with grad_out."""
    b, n, k, s, sigma = 2, 7, 3, 50, 0.1
    x = torch.randn(b, n, generator=_gen(1), dtype=torch.float64).requires_grad_(True)
    g = torch.randn(b, k, n, generator=_gen(2), dtype=torch.float64)
    (PerturbedTopKFunction.apply(x, k, s, sigma, _gen(3)) * g).sum().backward()
    ind, z = _draw_one_hots(x.detach(), k, s, sigma, seed=3)
    expected_gradient = (ind[..., None] * z[:, :, None, None, :]).mean(dim=1) / sigma     # (B, K, N, N)
    torch.testing.assert_close(x.grad, torch.einsum("bkn,bknd->bd", g, expected_gradient), rtol=1e-12, atol=1e-12)


def test_gradient_matches_the_exact_gradient_for_two_patches() -> None:
    """N = 2, K = 1: row 0 picks patch 0 with probability Phi((x0 - x1) / (sigma * sqrt 2)), so the smoothed
    objective <W, Y> has a closed-form gradient."""
    sigma, s = 0.5, 100_000
    x = torch.tensor([0.2, -0.1], dtype=torch.float64, requires_grad=True)
    w = torch.tensor([[1.5, -0.5]], dtype=torch.float64)
    (perturbed_topk(x, 1, num_samples=s, sigma=sigma, generator=_gen(4)) * w).sum().backward()
    scale = sigma * math.sqrt(2.0)
    dens = math.exp(-0.5 * (0.3 / scale) ** 2) / math.sqrt(2 * math.pi) / scale
    exact = torch.tensor([1.0, -1.0], dtype=torch.float64) * (w[0, 0] - w[0, 1]) * dens     # about 1.44
    # standard error of the estimator: sd(<W,Y> Z) / sigma / sqrt(S) <= 1.5 / 0.5 / 316 < 0.01; 0.05 is 5 of them
    torch.testing.assert_close(x.grad, exact, rtol=0, atol=0.05)


def test_gradient_matches_finite_differences_of_the_smoothed_objective() -> None:
    """f(x) = E_Z[<W, one_hot(sorted topk(x + sigma Z))>]: autograd's gradient of (perturbed_topk(x) * W).sum()
    against central finite differences of f with common random numbers (one shared set of draws, independent of
    the operator's own)."""
    n, k, sigma = 6, 2, 0.5
    x = torch.tensor([0.3, -0.2, 0.5, 0.1, -0.4, 0.25], dtype=torch.float64)
    w = torch.randn(k, n, generator=_gen(5), dtype=torch.float64)
    xr = x.clone().requires_grad_(True)
    (perturbed_topk(xr, k, num_samples=100_000, sigma=sigma, generator=_gen(6)) * w).sum().backward()

    s, h = 200_000, 0.05
    z = torch.randn(s, n, generator=_gen(8), dtype=torch.float64)
    shifts = torch.eye(n, dtype=torch.float64) * h
    points = torch.cat([x + shifts, x - shifts])                                           # (2N, N)
    idx = torch.topk(points[:, None, :] + sigma * z, k, dim=-1).indices.sort(dim=-1).values  # (2N, S, K)
    value = w[torch.arange(k), idx].sum(dim=-1)                                            # (2N, S): <W, one_hot>
    diff = (value[:n] - value[n:]) / (2 * h)
    fd = diff.mean(dim=1)
    # Tolerance: the measured standard errors (over W seeds 5..11) are <= 0.011 for autograd (S = 1e5,
    # sd(<W,Y> Z_d) / sigma ~ 3) and <= 0.015 for the finite differences, so the difference has sd <= 0.02 per
    # coordinate (observed max |difference| 0.015..0.027); the central difference's bias is O((h / sigma)^2 / 6),
    # ~0.2 % of gradients of size <= 1.5. 0.1 is 5 sd and far above the bias, while the largest gradient here is
    # 0.68 and the diagonal-only Jacobian is off by >= 0.34 (checked below), so the test has power.
    assert float(fd.abs().max()) > 0.5                                                     # the test is not vacuous
    torch.testing.assert_close(xr.grad, fd, rtol=0, atol=0.1)

    # power: the diagonal-only contraction ("bnkd,bnd->bkd", n == d terms only) would fail this tolerance
    ind, zz = _draw_one_hots(x[None], k, 100_000, sigma, seed=6)
    diagonal = ((w * ind[0]).sum(dim=1) * zz[0]).mean(dim=0) / sigma
    assert float((diagonal - fd).abs().max()) > 0.25


def test_tiny_sigma_gives_exactly_the_hard_topk() -> None:
    # well-separated scores (gaps >= 1e-3), so noise of 1e-6 * |Z| (|Z| < 10) never reorders them
    x = torch.randperm(20, generator=_gen(9)).to(torch.float32).mul(1e-3).reshape(2, 10)
    out = perturbed_topk(x, 3, num_samples=32, sigma=1e-6, generator=_gen(10))
    hard = F.one_hot(hard_topk_indices(x, 3), 10).to(x.dtype)
    assert torch.equal(out, hard)
    assert torch.equal(out, perturbed_topk(x, 3, training=False))


def test_k_at_least_n_selects_every_patch_and_k_zero_raises() -> None:
    x = torch.rand(4, generator=_gen(11), requires_grad=True)
    for training in (True, False):
        out = perturbed_topk(x, 10, training=training, generator=_gen(12))
        assert out.shape == (4, 4)
        assert torch.equal(out.detach(), torch.eye(4))
    assert torch.equal(hard_topk_indices(x, 10), torch.arange(4))
    # K = N: every draw selects all, so the output is constant in x and gets no (Monte-Carlo noise) gradient
    out = perturbed_topk(x, 4, generator=_gen(13))
    assert torch.equal(out, torch.eye(4)) and not out.requires_grad
    assert perturbed_topk(torch.rand(2, 3), 5, generator=_gen(14)).shape == (2, 3, 3)
    for bad in (0, -1):
        with pytest.raises(ValueError, match="K must be at least 1"):
            perturbed_topk(x, bad)
        with pytest.raises(ValueError, match="K must be at least 1"):
            hard_topk_indices(x, bad)


def test_eval_mode_is_the_hard_topk_without_noise_or_gradient() -> None:
    x = torch.tensor([[0.1, 0.9, 0.3, 0.7, 0.2], [0.5, 0.4, 0.3, 0.2, 0.1]], requires_grad=True)
    out = perturbed_topk(x, 2, training=False)
    expected = torch.tensor([[[0, 1, 0, 0, 0], [0, 0, 0, 1, 0]],
                             [[1, 0, 0, 0, 0], [0, 1, 0, 0, 0]]], dtype=torch.float32)
    assert torch.equal(out, expected)
    assert not out.requires_grad
    state = torch.random.get_rng_state()
    assert torch.equal(perturbed_topk(x, 2, training=False), out)      # deterministic, and draws no noise
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(hard_topk_indices(x, 2), torch.tensor([[1, 3], [0, 1]]))
    # unbatched (N,) gives (K, N) and (K,), in eval and in training, and the gradient has x's shape
    assert torch.equal(perturbed_topk(x[0].detach(), 2, training=False), expected[0])
    assert torch.equal(hard_topk_indices(x[0], 2), torch.tensor([1, 3]))
    xu = x[0].detach().clone().requires_grad_(True)
    soft = perturbed_topk(xu, 2, num_samples=16, sigma=0.3, generator=_gen(15))
    assert soft.shape == (2, 5) and soft.requires_grad
    soft[0, 1].backward()
    assert xu.grad is not None and xu.grad.shape == (5,)
    assert perturbed_topk(x, 2, num_samples=16, generator=_gen(16)).shape == (2, 2, 5)


def test_generator_makes_the_noise_reproducible_and_bad_input_is_refused() -> None:
    x = torch.rand(2, 8, generator=_gen(17))
    a = perturbed_topk(x, 3, num_samples=20, sigma=0.5, generator=_gen(18))
    b = perturbed_topk(x, 3, num_samples=20, sigma=0.5, generator=_gen(18))
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="shape"):
        perturbed_topk(torch.rand(2, 3, 4), 2)
    with pytest.raises(ValueError, match="empty"):
        perturbed_topk(torch.rand(0), 2)
    with pytest.raises(ValueError, match="sigma"):
        perturbed_topk(x, 2, sigma=0.0)
    with pytest.raises(ValueError, match="num_samples"):
        perturbed_topk(x, 2, num_samples=0)
