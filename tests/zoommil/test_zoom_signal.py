"""The zoom heads' training signal (issue #17, ZoomMIL missing the tumour): the leave-one-out baseline in the
perturbed top-K's gradient, a noise scale tied to the spread of a bag's scores, and zooming on the level's own
attention. Each fails without its change: the baseline's gradient is exactly 0 where every draw picks the same
patches (the plain estimator returns ~50 |c| of noise there) and still the smoothed objective's gradient
where the draws differ; the spread-tied sigma follows the scores; "attention" selects the top-K of the
attention and is what a saved run predicts with."""

from __future__ import annotations

import math

import pytest
import torch

from napari_wsimil.zoommil.network import ZoomMILNet, full_bag_fetch
from napari_wsimil.zoommil.topk import perturbed_topk


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_baseline_gradient_is_zero_when_no_draw_changes_the_selection() -> None:
    # gaps of 0.05 against sigma = 0.002 (the paper's, on a 16-patch softmax): every draw picks the same two
    x = torch.linspace(0.0, 0.75, 16, dtype=torch.float64).requires_grad_(True)
    w = torch.randn(2, 16, generator=_gen(1), dtype=torch.float64)
    (perturbed_topk(x, 2, num_samples=100, sigma=0.002, generator=_gen(2)) * w).sum().backward()
    plain = x.grad.clone()
    x.grad = None
    (perturbed_topk(x, 2, num_samples=100, sigma=0.002, generator=_gen(2), baseline=True) * w).sum().backward()
    # the plain estimator: c · mean_s(Z) / sigma, zero-mean noise of sd |c| / (sigma sqrt S) per patch
    c = float(w[0, 14] + w[1, 15])
    assert float(plain.abs().max()) > 5 * abs(c)
    assert torch.equal(x.grad, torch.zeros_like(x.grad))


def test_baseline_gradient_matches_the_exact_gradient_for_two_patches() -> None:
    """As test_topk's closed form (N = 2, K = 1): the control variate leaves the expected gradient unchanged, and
    its estimate is closer to it than the plain one with the same draws."""
    sigma, s = 0.5, 20_000
    w = torch.tensor([[1.5, -0.5]], dtype=torch.float64)
    scale = sigma * math.sqrt(2.0)
    dens = math.exp(-0.5 * (0.3 / scale) ** 2) / math.sqrt(2 * math.pi) / scale
    exact = torch.tensor([1.0, -1.0], dtype=torch.float64) * (w[0, 0] - w[0, 1]) * dens
    errors = {}
    for baseline in (False, True):
        err = []
        for seed in range(10):
            x = torch.tensor([0.2, -0.1], dtype=torch.float64, requires_grad=True)
            (perturbed_topk(x, 1, num_samples=s, sigma=sigma, generator=_gen(seed), baseline=baseline) * w
             ).sum().backward()
            err.append(float((x.grad - exact).abs().max()))
        errors[baseline] = err
    assert max(errors[True]) < 0.05                       # unbiased: 5 standard errors
    assert sum(errors[True]) < sum(errors[False])         # and less noisy on the same draws


def _net(**kw) -> ZoomMILNet:
    torch.manual_seed(0)
    return ZoomMILNet(8, 2, [2, 2], hidden=16, attn_hidden=8, dropout=0.0, k=3, num_samples=50, **kw)


def _bag(n0: int = 10) -> list[torch.Tensor]:
    g = _gen(3)
    return [torch.randn(n0 * m, 8, generator=g) for m in (1, 4, 16)]


def test_sigma_spread_ties_the_noise_to_the_scores_spread() -> None:
    z = torch.softmax(torch.randn(16, generator=_gen(4)), 0)
    assert _net().noise_scale(z) == 0.002
    assert _net(sigma_spread=0.5).noise_scale(z) == pytest.approx(0.5 * float(z.std()))
    assert _net(sigma_spread=0.5).noise_scale(z[:1]) == 0.002        # one patch: nothing to spread over


def test_zoom_heads_get_a_gradient_with_spread_sigma_and_none_from_noise_with_baseline() -> None:
    levels = _bag()
    for kw, expect_signal in (({"sigma": 1e-9, "baseline": True}, False), ({"sigma_spread": 1.0, "baseline": True}, True)):
        net = _net(**kw).train()
        out = net(levels[0], full_bag_fetch(levels))
        out.logits[1].backward()
        g = torch.cat([p.grad.reshape(-1) for p in net.zoom[0].parameters()])
        assert (float(g.abs().max()) > 0) == expect_signal, kw


def test_zoom_on_attention_selects_the_top_k_of_the_attention() -> None:
    levels = _bag()
    for zoom_on in ("zoom", "attention"):
        net = _net(zoom_on=zoom_on).eval()
        with torch.no_grad():
            out = net(levels[0], full_bag_fetch(levels))
            h = net.fc[0]((levels[0] - net.input_mean) / net.input_std)
            head = net.att[0] if zoom_on == "attention" else net.zoom[0]
            expect = torch.topk(head(h)[0].reshape(-1), 3).indices.sort().values
        assert torch.equal(out.selected[0], expect), zoom_on
    with pytest.raises(ValueError, match="zoom_on"):
        _net(zoom_on="nowhere")


def test_a_saved_run_predicts_with_its_zoom_settings(tmp_path) -> None:
    """zoom_on changes which patches prediction reads, so a run must be rebuilt with its own (not the defaults)."""
    import json

    from safetensors.torch import save_file

    from napari_wsimil.train.registry import make_config
    from napari_wsimil.zoommil.predict import load_zoom_run

    assert make_config("zoommil").baseline is True and make_config("zoommil").zoom_on == "zoom"
    net = _net(zoom_on="attention", baseline=False)
    cfg = {"k": 3, "hidden": 16, "attn_hidden": 8, "dropout": 0.0, "num_samples": 50, "zoom_on": "attention",
           "baseline": False, "sigma_spread": 0.25}
    (tmp_path / "run.json").write_text(json.dumps({"format": 1, "family": "zoommil", "method": "zoommil",
                                                   "levels": [4, 2, 1],
                                                   "patch": 32, "encoder": "handcrafted", "classes": ["0", "1"]}))
    (tmp_path / "last.json").write_text(json.dumps({"format": 1, "epoch": 1, "config": cfg, "method": {
        "name": "zoommil", "in_dim": 8, "n_classes": 2, "ratios": [2, 2]}}))
    save_file(net.state_dict(), str(tmp_path / "best.safetensors"))
    model = load_zoom_run(tmp_path, device="cpu").model
    assert (model.zoom_on, model.baseline, model.sigma_spread) == ("attention", False, 0.25)
