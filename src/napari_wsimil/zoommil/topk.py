"""The differentiable perturbed top-K of Cordonnier et al. 2021 ("Differentiable Patch Selection for Image
Recognition", CVPR), the operator ZoomMIL uses to pick which patches to zoom into.

Why perturbed: a hard top-K is piecewise constant in the scores, so its gradient is zero almost everywhere and the
attention that scores the patches would never learn where to zoom. Adding Gaussian noise ``sigma * Z`` to the scores
and averaging the hard top-K one-hots over the draws gives a smooth function of the scores,

    Y(x) = E_Z[ one_hot(sort(topk(x + sigma * Z, K))) ],     shape (K, N) per bag,

whose Jacobian has the closed form (Gaussian integration by parts, Berthet et al. 2020)

    dY[k, n] / dx[d] = E_Z[ one_hot(...)[k, n] * Z[d] ] / sigma,

estimated with the same draws as the forward. Row ``k`` of ``Y`` is a soft one-hot over the patches: a feature bag
``(N, D)`` multiplied by ``Y`` gives the ``K`` selected patch features, and because the indices of each draw are
sorted the ``K`` rows follow the patches' order (as in the reference), not their score order.

At evaluation the noise is dropped and the operator is the hard top-K (:func:`perturbed_topk` with
``training=False``, or :func:`hard_topk_indices` for the prediction path that reads only the selected children).

Torch is imported here at module top: this module is imported only when a ZoomMIL model is trained or predicts, and
``napari_wsimil.zoommil`` (its ``__init__``) does not import it.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["PerturbedTopKFunction", "perturbed_topk", "hard_topk_indices"]


def _check_k(k: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"K must be an int, got {type(k).__name__}")
    if k < 1:
        raise ValueError(f"K must be at least 1 (the number of patches to select), got K={k}")


def _as_batch(x: Tensor) -> tuple[Tensor, bool]:
    """``x`` as ``(B, N)`` and whether it came unbatched ``(N,)``."""
    if not isinstance(x, Tensor):
        raise TypeError(f"the scores must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() == 1:
        x, unbatched = x.unsqueeze(0), True
    elif x.dim() == 2:
        unbatched = False
    else:
        raise ValueError(f"the scores must have shape (N,) or (B, N), got {tuple(x.shape)}")
    if x.shape[-1] == 0:
        raise ValueError("cannot select patches from an empty bag (N = 0)")
    if not x.is_floating_point():
        raise TypeError(f"the scores must be floating point, got {x.dtype}")
    return x, unbatched


def _sorted_topk(x: Tensor, k: int) -> Tensor:
    """The indices of the ``k`` largest entries of the last axis, sorted by patch index (ascending), so that the
    selected rows follow the patches' order rather than the scores' order, as in the reference."""
    idx = torch.topk(x, k=k, dim=-1, sorted=False).indices
    return torch.sort(idx, dim=-1).values


def _draw_noise(shape: tuple[int, ...], like: Tensor, generator: torch.Generator | None) -> Tensor:
    """Standard normal noise of ``shape`` with ``like``'s dtype on ``like``'s device.

    The draw is exactly ``torch.randn(shape, generator=generator, dtype=like.dtype, device=...)`` on the generator's
    device (then moved), so that a test with the same seed can reproduce it. A CPU generator thus also serves a
    CUDA input (the noise is drawn on the CPU and copied)."""
    if generator is None:
        return torch.randn(shape, dtype=like.dtype, device=like.device)
    z = torch.randn(shape, generator=generator, dtype=like.dtype, device=generator.device)
    return z.to(like.device)


class PerturbedTopKFunction(torch.autograd.Function):
    """The perturbed top-K as an autograd function on batched scores ``x`` of shape ``(B, N)``, ``1 <= k <= N``.

    Forward: draws ``Z ~ N(0, 1)`` of shape ``(B, S, N)``, takes the top-``k`` indices of ``x + sigma * Z`` per draw,
    sorts them by patch index, and returns the mean of their one-hots over the ``S`` draws: ``(B, K, N)``.

    Backward: the reference (Cordonnier's supplementary code) materialises

        expected_gradient[b, k, n, d] = mean_s( one_hot[b, s, k, n] * Z[b, s, d] ) / sigma     # (B, K, N, N)
        grad_x[b, d] = sum_{k, n} grad_out[b, k, n] * expected_gradient[b, k, n, d]

    which is ``B * K * N * N`` floats: 1.6 GB for one bag of N = 10,000 patches and K = 4, and it needs the
    ``(B, S, K, N)`` one-hots besides. Both sums are finite and linear, so they can be reordered:

        grad_x[b, d] = mean_s( c[b, s] * Z[b, s, d] ) / sigma,
        c[b, s]      = sum_{k, n} grad_out[b, k, n] * one_hot[b, s, k, n] = sum_k grad_out[b, k, idx[b, s, k]],

    i.e. ``c`` is the incoming gradient read at the selected patch of each row of each draw. This is the same
    number (up to floating-point summation order) and needs only the ``(B, S, N)`` noise and the ``(B, S, K)``
    indices, which is all that is saved for backward; the forward likewise builds its mean with a scatter instead
    of the ``(B, S, K, N)`` one-hots.

    Note: histocartography/zoommil's ``utils/perturbedtopk.py`` contracts with ``"bnkd,bnd->bkd"``, which keeps only
    the ``n == d`` terms of the Jacobian above (a patch's score moves only its own column of the output). This class
    implements the full Jacobian of the paper, which is the gradient of the smoothed objective.

    ``generator`` (optional) makes the noise reproducible; it is not differentiated.

    ``baseline`` (optional, last): subtract from each draw's ``c[b, s]`` the mean of the OTHER draws' ``c``
    (a leave-one-out control variate). The estimate stays unbiased (that mean does not depend on ``Z[b, s]``, whose
    mean is 0), but its noise no longer scales with ``|c|``: when every draw selects the same patches (scores
    spread far beyond ``sigma``), every ``c[b, s]`` is equal and the gradient is exactly 0 instead of
    ``c · mean_s(Z) / sigma``, a zero-mean noise of standard deviation ``|c| / (sigma · sqrt(S))`` (50 |c| at
    the paper's sigma = 0.002 and S = 100) that drives the zoom heads at random.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, k: int, num_samples: int, sigma: float,  # type: ignore[override]
                generator: torch.Generator | None = None, baseline: bool = False) -> Tensor:
        b, n = x.shape
        noise = _draw_noise((b, num_samples, n), x, generator)                    # (B, S, N)
        idx = _sorted_topk(x.detach().unsqueeze(1) + sigma * noise, k)            # (B, S, K)
        # mean over S of one_hot(idx) without the (B, S, K, N) one-hots: count the draws that put patch n in row k
        # (integer counts, exact in floating point), then divide by S, so that a patch chosen in every draw gets
        # exactly 1 (adding 1/S S times would not), as the reference's one_hot(...).mean(dim=1) does
        counts = torch.zeros((b, k, n), dtype=x.dtype, device=x.device)
        counts.scatter_add_(2, idx.transpose(1, 2), torch.ones((b, k, num_samples), dtype=x.dtype, device=x.device))
        out = counts / num_samples
        ctx.sigma = sigma
        ctx.num_samples = num_samples
        ctx.baseline = bool(baseline) and num_samples > 1
        ctx.save_for_backward(noise, idx)
        return out

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor  # type: ignore[override]
                 ) -> tuple[Tensor | None, None, None, None, None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None, None
        noise, idx = ctx.saved_tensors                                            # (B, S, N), (B, S, K)
        # c[b, s] = sum_k grad_output[b, k, idx[b, s, k]]
        c = grad_output.gather(2, idx.transpose(1, 2)).sum(dim=1)                 # (B, K, S) -> (B, S)
        if ctx.baseline:  # leave-one-out control variate (see the class doc)
            # shifted by the first draw's value first (the baseline is shift-invariant), so that equal c's give
            # exactly 0: a rounding residue would be multiplied by 1 / (S sigma)
            c = c - c[:, :1]
            c = c - (c.sum(dim=1, keepdim=True) - c) / (ctx.num_samples - 1)
        grad_x = torch.einsum("bs,bsn->bn", c.to(noise.dtype), noise) / (ctx.num_samples * ctx.sigma)
        return grad_x, None, None, None, None, None


def hard_topk_indices(x: Tensor, k: int) -> Tensor:
    """The indices of the ``k`` highest scores, sorted by patch index: ``(K,)`` for scores ``(N,)``, ``(B, K)`` for
    ``(B, N)``. ``k`` is clamped to ``N`` (a bag of ``N <= k`` patches selects them all).

    This is the evaluation-time selection: the prediction path reads and encodes only these children. The sort
    keeps it consistent with the row order of :func:`perturbed_topk`.
    """
    _check_k(k)
    xb, unbatched = _as_batch(x)
    idx = _sorted_topk(xb.detach(), min(k, xb.shape[-1]))
    return idx.squeeze(0) if unbatched else idx


def perturbed_topk(x: Tensor, k: int, num_samples: int = 100, sigma: float = 0.002, training: bool = True,
                   generator: torch.Generator | None = None, baseline: bool = False) -> Tensor:
    """The differentiable top-K selection matrix of the scores ``x``: ``(K, N)`` for ``(N,)``, ``(B, K, N)`` for
    ``(B, N)``. Row ``k`` is a (soft, in training) one-hot over the ``N`` patches; rows follow the patch order.

    Args:
        x: the patch scores, e.g. a softmax of attention, ``(N,)`` or ``(B, N)``.
        k: how many patches to select. Clamped to ``N``, so a small bag with ``N <= k`` selects all its patches
            (``K_eff = N`` rows, the identity, with no gradient: it is constant in ``x``) instead of failing;
            ``k < 1`` raises ``ValueError``.
        num_samples: the noise draws ``S`` per bag. Forward and backward are Monte-Carlo estimates whose standard
            error falls as ``1 / sqrt(S)``.
        sigma: the noise scale, in the units of ``x``. The smoothing (and the gradient) reaches only patches whose
            scores are within a few ``sigma`` of the K-th score; the gradient estimate's variance grows as
            ``1 / sigma**2``. ZoomMIL's default 0.002 suits softmax scores.
        training: ``False`` returns the hard top-K one-hots (no noise, no gradient), as ZoomMIL does at evaluation.
        generator: an optional ``torch.Generator`` for reproducible noise (the draw is
            ``torch.randn((B, S, N), generator=generator, dtype=x.dtype)`` on the generator's device).
        baseline: the leave-one-out control variate in the gradient estimate (:class:`PerturbedTopKFunction`):
            the same expected gradient, without the noise that does not depend on how the selection changes.

    Memory: besides the ``(B, K, N)`` output, training keeps the ``(B, S, N)`` noise and ``(B, S, K)`` indices for
    backward; the reference's ``(B, K, N, N)`` expected Jacobian is never built (see :class:`PerturbedTopKFunction`).
    """
    _check_k(k)
    xb, unbatched = _as_batch(x)
    k_eff = min(k, xb.shape[-1])
    if not training or k_eff == xb.shape[-1]:
        # K >= N: every draw selects every patch, so the smoothed output is exactly the identity and its true
        # gradient is exactly zero. The Monte-Carlo backward would instead return (sum_k g[k, k]) * mean_s(Z_s) / sigma,
        # zero only in expectation and, at sigma = 0.002 and S = 100, of standard deviation ~50 |g|: pure noise into
        # the attention of a small bag. So the hard (here constant) one-hots are returned, without a graph.
        out = F.one_hot(_sorted_topk(xb.detach(), k_eff), num_classes=xb.shape[-1]).to(xb.dtype)
    else:
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
        if not sigma > 0:
            raise ValueError(f"sigma must be positive, got {sigma!r}")
        out = PerturbedTopKFunction.apply(xb, k_eff, num_samples, float(sigma), generator, bool(baseline))
    return out.squeeze(0) if unbatched else out
