"""Networks and losses of napari_wsimil.seg: shapes, trainability, seamless tiling, and the loss maths."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

from napari_wsimil.seg.losses import (
    beta1_from_fpr,
    confkd_loss,
    generalised_kl,
    hybrid_pseudo_labels,
    pinchaud_loss,
    slide_logits,
    soft_bce,
    top_k_slide_score,
)
from napari_wsimil.seg.nets import (
    BranchNet,
    DualDecoderNet,
    SegUNet,
    autoencoder_pretrain_net,
    fold_batch_norm,
    receptive_margin,
    receptive_radius,
    reconstruction_loss,
    transfer_encoder,
)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# ------------------------------------------------------------------------------------------- nets


def test_segunet_shapes_and_input_checks():
    net = SegUNet()  # paper defaults: width 32, depth 4
    assert net.encoder.channels == [32, 64, 128, 256]
    assert net(torch.rand(2, 3, 64, 48)).shape == (2, 2, 64, 48)
    small = SegUNet(in_channels=1, n_classes=3, width=4, depth=2)
    assert small(torch.rand(1, 1, 6, 10)).shape == (1, 3, 6, 10)
    with pytest.raises(ValueError, match="multiples of 2"):
        net(torch.rand(1, 3, 60, 64))
    with pytest.raises(ValueError, match="expected a"):
        net(torch.rand(1, 4, 64, 64))


def test_skips_false_is_a_different_net():
    a, b = SegUNet(width=4, depth=3), SegUNet(width=4, depth=3, skips=False)
    n_a = sum(p.numel() for p in a.parameters())
    n_b = sum(p.numel() for p in b.parameters())
    assert n_b < n_a  # no concatenated skip channels in the decoder blocks
    sb = b.state_dict()
    b.load_state_dict({k: v for k, v in a.state_dict().items() if k in sb and v.shape == sb[k].shape},
                      strict=False)
    x = torch.rand(2, 3, 32, 32)
    assert b(x).shape == a(x).shape
    assert not torch.allclose(a.eval()(x), b.eval()(x))


def _disc_batch(n: int, size: int = 32, gen: torch.Generator | None = None):
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    imgs, masks = [], []
    for _ in range(n):
        cy, cx = torch.randint(8, size - 8, (2,), generator=gen).tolist()
        rad = float(torch.randint(4, 8, (1,), generator=gen))
        m = ((yy - cy) ** 2 + (xx - cx) ** 2) <= rad**2
        img = 0.2 * torch.rand(3, size, size, generator=gen) + 0.6 * m
        imgs.append(img)
        masks.append(m.long())
    return torch.stack(imgs), torch.stack(masks)


def test_net_overfits_bright_discs():
    gen = torch.Generator().manual_seed(1)
    x, y = _disc_batch(8, gen=gen)
    net = SegUNet(width=8, depth=3)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    losses = []
    for _ in range(40):
        loss = F.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0]
    net.eval()
    with torch.no_grad():
        acc = (net(x).argmax(1) == y).float().mean().item()
    assert acc > 0.97


def _tiled_predict(net, image: torch.Tensor, core: int, margin: int) -> torch.Tensor:
    """Run ``net`` on core×core tiles, each read with ``margin`` px of context (clipped at the image)."""
    _, _, h, w = image.shape
    out = image.new_empty(image.shape[0], net.n_classes, h, w)
    for y0 in range(0, h, core):
        for x0 in range(0, w, core):
            ya, xa = max(0, y0 - margin), max(0, x0 - margin)
            yb, xb = min(h, y0 + core + margin), min(w, x0 + core + margin)
            pred = net(image[:, :, ya:yb, xa:xb])
            out[:, :, y0:y0 + core, x0:x0 + core] = pred[:, :, y0 - ya:y0 - ya + core, x0 - xa:x0 - xa + core]
    return out


@pytest.mark.parametrize("depth", [3, 4])
def test_tiled_inference_with_margin_is_seamless(depth):
    net = SegUNet(width=4, depth=depth)
    # Populate the batch-norm running statistics so eval mode is not the identity normalisation.
    with torch.no_grad():
        for _ in range(3):
            net(torch.rand(2, 3, 64, 64))
    net.eval()
    margin = receptive_margin(net)
    assert margin == net.margin and margin % 2 ** (depth - 1) == 0
    core = 2 ** (depth - 1) * 4
    image = torch.rand(1, 3, 3 * core + 2 * margin, 2 * core + 2 * margin)
    with torch.no_grad():
        whole = net(image)
        tiled = _tiled_predict(net, image, core, margin)
        no_margin = _tiled_predict(net, image, core, 0)
    inner = (slice(None), slice(None), slice(margin, -margin), slice(margin, -margin))
    torch.testing.assert_close(tiled[inner], whole[inner], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(tiled, whole, atol=1e-5, rtol=1e-4)  # clipped at the image: exact there too
    assert (no_margin - whole).abs().max() > 1e-3  # the comparison does see seams


def _positive_net(depth: int) -> SegUNet:
    """All weights positive, float64: no cancellation and no dead ReLU, so even the far tail of the
    receptive field shows up well above rounding noise."""
    net = SegUNet(width=4, depth=depth).double().eval()
    with torch.no_grad():
        for p in net.parameters():
            p.abs_()
    return net


@pytest.mark.parametrize("depth", [3, 4])
def test_margin_is_exact(depth):
    net = _positive_net(depth)
    grid = 2 ** (depth - 1)
    margin = receptive_margin(net)
    core = grid * 4
    image = torch.rand(1, 3, 3 * core + 2 * margin, 2 * core + 2 * margin, dtype=torch.float64)
    with torch.no_grad():
        whole = net(image)
        scale = whole.abs().max()
        exact = (_tiled_predict(net, image, core, margin) - whole).abs().max() / scale
        short = (_tiled_predict(net, image, core, margin - grid) - whole).abs().max() / scale
    assert exact < 1e-12
    assert short > 1e-8  # one grid step less context than receptive_margin: seams


def test_margin_values_and_radius_is_tight():
    assert receptive_radius(4) == 52 and receptive_margin(4) == 48 and receptive_margin(SegUNet()) == 48
    assert receptive_radius(3) == 24 and receptive_margin(3) == 24
    # Empirical receptive field: over the 4 positions of a pooling cell, the gradient of one output pixel
    # reaches exactly receptive_radius px of input.
    net = _positive_net(3)
    reach = 0
    for c in range(48, 52):
        x = torch.rand(1, 3, 112, 112, dtype=torch.float64, requires_grad=True)
        net(x)[0, 1, c, c].backward()
        cols = torch.nonzero(x.grad.abs().sum(dim=(0, 1, 2)) > 0).flatten()
        reach = max(reach, c - cols.min().item(), cols.max().item() - c)
    assert reach == receptive_radius(3)


def test_autoencoder_pretrain_and_transfer():
    ae = autoencoder_pretrain_net(width=4, depth=3)
    assert not ae.skips
    x = torch.rand(2, 3, 32, 32)
    rec = ae(x)
    assert rec.shape == x.shape
    loss = reconstruction_loss(rec, x)
    assert loss.item() == pytest.approx(((rec - x) ** 2).mean().item())
    loss.backward()
    with torch.no_grad():
        for p in ae.parameters():
            p.add_(0.01 * torch.randn_like(p))

    seg = SegUNet(width=4, depth=3)
    names = transfer_encoder(ae, seg)
    enc = [k for k in seg.state_dict() if k.startswith("encoder.")]
    assert set(enc) <= set(names)
    assert any(n.startswith("decoder.ups.") for n in names)
    assert not any(n.startswith("decoder.head.") for n in names)
    for n in names:
        torch.testing.assert_close(seg.state_dict()[n], ae.state_dict()[n])
    # The first conv of a skip-connected decoder block has twice the input channels: not copied.
    assert "decoder.blocks.0.body.0.0.weight" not in names

    dual = DualDecoderNet(width=4, depth=3)
    dnames = transfer_encoder(ae, dual)
    assert "teacher.ups.0.weight" in dnames and "student.ups.0.weight" in dnames
    with pytest.raises(ValueError, match="encoders differ"):
        transfer_encoder(autoencoder_pretrain_net(width=8, depth=3), seg)


def test_dual_decoder_net():
    net = DualDecoderNet(width=4, depth=3)
    x = torch.rand(2, 3, 32, 32)
    t, s = net(x)
    assert t.shape == s.shape == (2, 2, 32, 32)
    assert not torch.allclose(t, s)
    assert net.margin == receptive_margin(3)
    # Both decoders reuse the SegUNet building blocks.
    assert type(net.teacher) is type(SegUNet(width=4, depth=3).decoder)


def _trained_bn_stats(net):
    """Batch norms with statistics and affine parameters far from their initial identity."""
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.2, 3)
            m.weight.data.uniform_(0.5, 2)
            m.bias.data.uniform_(-0.5, 0.5)
    return net.eval()


@pytest.mark.parametrize("dual", [False, True])
def test_fold_batch_norm_gives_the_same_maps(dual):
    net = _trained_bn_stats(DualDecoderNet(width=8, depth=3) if dual else SegUNet(width=8, depth=3))
    x = torch.rand(2, 3, 64, 64)
    fused = fold_batch_norm(net)
    n_bn = sum(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())
    assert n_bn > 10 and not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())
    with torch.no_grad():
        ref, out = net(x), fused(x)
    for r, o in zip(ref if dual else [ref], out if dual else [out]):
        assert torch.allclose(r, o, atol=1e-4), (r - o).abs().max()
    # the net itself still has its batch norms and trains as before
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules()) == n_bn
    with pytest.raises(ValueError, match="eval mode"):
        fold_batch_norm(net.train())


def test_branch_net_is_one_decoder_of_the_dual_net():
    net = _trained_bn_stats(DualDecoderNet(width=4, depth=3))
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        t, s = net(x)
        assert torch.equal(BranchNet(net, "teacher").eval()(x), t)
        assert torch.equal(BranchNet(net, "student").eval()(x), s)
    with pytest.raises(ValueError, match="teacher"):
        BranchNet(net, "both")


# ---------------------------------------------------------------------------------- Pinchaud losses


def test_slide_logits_eta_limits_and_mask():
    logits = torch.randn(3, 2, 8, 8)
    flat1 = logits[:, 1].reshape(3, -1)
    tiny = slide_logits(logits, eta=0.1)
    torch.testing.assert_close(tiny[:, 1], flat1.max(dim=1).values)
    torch.testing.assert_close(tiny[:, 0], logits[:, 0].mean(dim=(1, 2)))
    full = slide_logits(logits, eta=100)
    torch.testing.assert_close(full[:, 1], flat1.mean(dim=1))
    half = slide_logits(logits, eta=50)
    torch.testing.assert_close(half[:, 1], flat1.sort(dim=1, descending=True).values[:, :32].mean(dim=1))
    assert slide_logits(logits[0], eta=50).shape == (2,)

    mask = torch.zeros(3, 8, 8, dtype=torch.bool)
    mask[:, :4] = True
    masked = slide_logits(logits, eta=100, mask=mask)
    torch.testing.assert_close(masked[:, 0], logits[:, 0, :4].mean(dim=(1, 2)))
    torch.testing.assert_close(masked[:, 1], logits[:, 1, :4].mean(dim=(1, 2)))
    mask[1] = False
    mask[1, 2, 3] = True  # one tissue pixel: max = mean = that pixel
    torch.testing.assert_close(slide_logits(logits, eta=50, mask=mask)[1], logits[1, :, 2, 3])
    mask[2] = False
    with pytest.raises(ValueError, match="no pixel"):
        slide_logits(logits, mask=mask)


def test_slide_logits_gradient_reaches_top_pixels_only():
    logits = torch.randn(1, 2, 4, 4, requires_grad=True)
    slide_logits(logits, eta=25)[0, 1].backward()
    g = logits.grad[0, 1].flatten()
    assert (g > 0).sum() == 4 and torch.allclose(g[g > 0], torch.full((4,), 0.25))
    top4 = logits[0, 1].flatten().topk(4).indices
    assert set(torch.nonzero(g).flatten().tolist()) == set(top4.tolist())


def _rand_dist(*shape):
    return torch.softmax(torch.randn(*shape, dtype=torch.float64), dim=-1)


def test_generalised_kl_is_kl_at_beta_zero_and_continuous():
    p, q = _rand_dist(5, 3), _rand_dist(5, 3)
    kl = F.kl_div(q.log(), p, reduction="none").sum(-1)
    torch.testing.assert_close(generalised_kl(p, q, 0.0), kl)
    torch.testing.assert_close(generalised_kl(p, q.log(), [0.0, 0.0, 0.0], log_q=True), kl)
    # Continuous at 0: |L_β − KL| = O(β); float32 as well (expm1 formulation).
    x = (q / p).log()
    first_order = kl - 1e-6 / 2 * (p * x**2).sum(-1)  # expm1(βx)/β = x + βx²/2 + O(β²)
    torch.testing.assert_close(generalised_kl(p, q, 1e-6), first_order, atol=1e-11, rtol=0)
    p32, q32 = p.float(), q.float()
    torch.testing.assert_close(generalised_kl(p32, q32, 1e-7), generalised_kl(p32, q32, 0.0),
                               atol=1e-6, rtol=0)
    # Per-class β: class 0 at 0 is exactly the KL term.
    mixed = generalised_kl(p, q, [0.0, 0.5, 0.5])
    manual = (p[:, 0] * (p[:, 0] / q[:, 0]).log()
              - (p[:, 1:] / 0.5 * ((q[:, 1:] / p[:, 1:]) ** 0.5 - 1)).sum(-1))
    torch.testing.assert_close(mixed, manual)


def test_generalised_kl_known_values_at_beta_one():
    # β_i = 1: each term is −p_i (q_i/p_i − 1) = p_i − q_i, so L_1 = Σ p − Σ q = 0 for full-support p.
    p, q = _rand_dist(4, 2), _rand_dist(4, 2)
    torch.testing.assert_close(generalised_kl(p, q, 1.0), torch.zeros(4, dtype=torch.float64))
    p = torch.tensor([0.7, 0.3], dtype=torch.float64)
    q = torch.tensor([0.4, 0.6], dtype=torch.float64)
    # β = (0, 1): 0.7 log(0.7/0.4) + (0.3 − 0.6)
    expected = 0.7 * math.log(0.7 / 0.4) + (0.3 - 0.6)
    assert generalised_kl(p, q, [0.0, 1.0]).item() == pytest.approx(expected)
    # One-hot targets (p_i = 0 terms contribute 0): malignant target → 1 − q1 (MAE), benign → −log q0.
    q = torch.tensor([[0.8, 0.2]], dtype=torch.float64)
    assert generalised_kl(torch.tensor([[0.0, 1.0]], dtype=torch.float64), q, [0.0, 1.0]).item() == \
        pytest.approx(0.8)
    assert generalised_kl(torch.tensor([[1.0, 0.0]], dtype=torch.float64), q, [0.0, 1.0]).item() == \
        pytest.approx(-math.log(0.8))
    # β = 0.5, one-hot: −(1/0.5)(q_c^0.5 − 1) = 2(1 − sqrt(q_c)).
    assert generalised_kl(torch.tensor([[0.0, 1.0]], dtype=torch.float64), q, 0.5).item() == \
        pytest.approx(2 * (1 - math.sqrt(0.2)))


def test_generalised_kl_properties():
    p, q = _rand_dist(50, 2), _rand_dist(50, 2)
    for beta in ([0.0, 0.0], [0.0, 0.61], [0.3, 0.9], [-0.5, 1.0]):
        val = generalised_kl(p, q, beta)
        assert (val >= -1e-12).all()
        assert generalised_kl(p, p, beta).abs().max() < 1e-12
    with pytest.raises(ValueError, match="<= 1"):
        generalised_kl(p, q, [0.0, 1.5])
    # Gradients are finite, also with one-hot p and tiny β.
    logits = torch.randn(6, 2, requires_grad=True)
    onehot = F.one_hot(torch.tensor([0, 1, 0, 1, 0, 1]), 2).float()
    generalised_kl(onehot, F.log_softmax(logits, 1), [1e-9, 0.61], log_q=True).sum().backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def test_beta1_from_fpr_paper_numbers():
    # Section 3.1.1: r = 1/2, β0 = 0, γ = 33 %, θ0 = 5 %  →  β1 ≈ 0.61.
    b1 = beta1_from_fpr(gamma=0.33, r=0.5, theta0=0.05, beta0=0.0)
    assert b1 == pytest.approx(0.61, abs=0.005)
    # Defining equation: (1 − r) γ θ0^(β1 − 1) = r (1 − θ0)^(β0 − 1).
    for gamma, r, theta0, beta0 in [(0.33, 0.5, 0.05, 0.0), (0.6, 0.3, 0.1, 0.2), (0.1, 0.7, 0.01, 0.0)]:
        b1 = beta1_from_fpr(gamma, r, theta0, beta0)
        assert (1 - r) * gamma * theta0 ** (b1 - 1) == pytest.approx(r * (1 - theta0) ** (beta0 - 1))
    # θ0 at the KL optimum γ/(1+γ) (r = 1/2, the paper's "θ0 ≈ 0.25" for γ = 33 %) needs β1 = 0.
    assert beta1_from_fpr(0.33, 0.5, 0.33 / 1.33) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError):
        beta1_from_fpr(0.0, 0.5, 0.05)


def test_beta1_minimises_the_trivial_models_expected_loss():
    """The paper's trivial model, optimised numerically with our L_β: the optimum lands on θ0."""
    gamma, r = 0.33, 0.5
    theta = torch.linspace(1e-4, 0.6, 60001, dtype=torch.float64)
    q = torch.stack([1 - theta, theta], dim=1)
    benign = torch.tensor([1.0, 0.0], dtype=torch.float64).expand_as(q)
    malign = torch.tensor([0.0, 1.0], dtype=torch.float64).expand_as(q)

    def argmin(beta):
        exp_loss = r * generalised_kl(benign, q, beta) + (1 - r) * gamma * generalised_kl(malign, q, beta)
        return theta[exp_loss.argmin()].item()

    assert argmin([0.0, 0.0]) == pytest.approx(gamma / (1 + gamma), abs=1e-3)  # KL: ≈ 0.25
    assert argmin([0.0, beta1_from_fpr(gamma, r, 0.05)]) == pytest.approx(0.05, abs=1e-3)
    assert argmin([0.0, 1.0]) < 1e-3  # the paper's β1 = 1 drives θ0 to 0


def test_pinchaud_loss():
    logits = torch.randn(4, 2, 8, 8, requires_grad=True)
    label = torch.tensor([0, 1, 1, 0])
    loss = pinchaud_loss(logits, label, eta=50, beta=(0.0, 1.0))
    q = torch.softmax(slide_logits(logits, 50), dim=1)
    manual = torch.where(label == 1, 1 - q[:, 1], -q[:, 0].log()).mean()
    torch.testing.assert_close(loss, manual)
    loss.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0
    # β = 0 is cross-entropy on the slide logits.
    ce = F.cross_entropy(slide_logits(logits, 50), label)
    torch.testing.assert_close(pinchaud_loss(logits, label, 50, (0.0, 0.0)), ce)
    # An int label applies to the whole batch; a mask is passed through.
    mask = torch.ones(4, 8, 8, dtype=torch.bool)
    torch.testing.assert_close(pinchaud_loss(logits, 1, 50, (0.0, 0.0), mask=mask),
                               F.cross_entropy(slide_logits(logits, 50), torch.ones(4, dtype=torch.long)))


# ------------------------------------------------------------------------------ Hybrid Supervision


def test_hybrid_pseudo_labels():
    prob = torch.tensor([[[0.001, 0.1], [0.2, 0.5]],      # max 0.5 ≥ T: kept
                         [[0.01, 0.02], [0.3, 0.39]]])    # max 0.39 < T: dropped
    pseudo, keep = hybrid_pseudo_labels(prob, T=0.4, V=4.0)
    assert keep.tolist() == [True, False]
    expected = torch.tensor([[[0.0, 0.4], [0.8, 1.0]], [[0.04, 0.08], [1.0, 1.0]]])
    torch.testing.assert_close(pseudo, expected)  # 0.001·4 < 0.01 → 0; clipped at 1
    neg, keep_neg = hybrid_pseudo_labels(prob, positive=torch.tensor([True, False]))
    assert keep_neg.tolist() == [True, False]
    torch.testing.assert_close(neg[1], torch.zeros(2, 2))
    torch.testing.assert_close(neg[0], expected[0])
    assert hybrid_pseudo_labels(prob, positive=False)[0].abs().sum() == 0


def test_soft_bce_ignores_masked_pixels():
    logits = torch.randn(2, 4, 4, requires_grad=True)
    target = torch.rand(2, 4, 4)
    weight = torch.zeros(2, 4, 4)
    weight[0, :2] = 1
    loss = soft_bce(logits, target, weight)
    manual = F.binary_cross_entropy_with_logits(logits[0, :2], target[0, :2])
    torch.testing.assert_close(loss, manual)
    loss.backward()
    assert logits.grad[weight == 0].abs().max() == 0 and logits.grad[weight == 1].abs().sum() > 0
    # Changing ignored targets changes nothing.
    target2 = target.clone()
    target2[weight == 0] = 1 - target2[weight == 0]
    torch.testing.assert_close(soft_bce(logits, target2, weight.bool()), loss)
    # 2-class logits: P(1) = softmax = sigmoid(l1 − l0).
    two = torch.randn(2, 2, 4, 4)
    torch.testing.assert_close(soft_bce(two, target), soft_bce(two[:, 1] - two[:, 0], target))
    assert soft_bce(logits, target, torch.zeros_like(target)).item() == 0.0


def test_top_k_slide_score():
    probs = torch.tensor([[0.1, 0.9, 0.5, 0.7], [0.2, 0.2, 0.3, 0.0]])
    torch.testing.assert_close(top_k_slide_score(probs, 2), torch.tensor([0.8, 0.25]))
    torch.testing.assert_close(top_k_slide_score(probs[0], 10), probs[0].mean())
    rank = torch.tensor([[1.0, 0.0, 0.0, 2.0], [0.0, 0.5, 0.0, 1.0]])
    torch.testing.assert_close(top_k_slide_score(probs, 2, rank_by=rank), torch.tensor([0.4, 0.1]))
    with pytest.raises(ValueError):
        top_k_slide_score(probs, 0)


# ----------------------------------------------------------------------------------------- ConfKD


def test_confkd_loss_components():
    t = torch.randn(4, 2, 8, 8, requires_grad=True)
    s = torch.randn(4, 2, 8, 8, requires_grad=True)
    labels = torch.full((4, 8, 8), -1)
    labels[:2] = torch.randint(0, 2, (2, 8, 8))    # images 0, 1: dense labels
    labels[2, 3, 3], labels[2, 5, 5] = 1, 0          # image 2: two labelled pixels
    strong = torch.tensor([True, True, False, False])
    weak = ~strong
    out = confkd_loss(t, s, labels, strong, weak, w_ce=1.0, w_weak_ce=0.5, w_ent=0.1, w_kl=2.0)
    for key in ("ce_teacher", "ce_student", "entropy", "kl"):
        assert out[key].item() >= 0
    torch.testing.assert_close(out["ce_teacher"], F.cross_entropy(t[:2], labels[:2]))
    torch.testing.assert_close(out["ce_student"], F.cross_entropy(s[2:], labels[2:], ignore_index=-1))
    ps = torch.softmax(s[2:], 1)
    torch.testing.assert_close(out["entropy"], -(ps * ps.log()).sum(1).mean())
    kl = F.kl_div(F.log_softmax(s, 1), F.log_softmax(t, 1), log_target=True, reduction="none").sum(1).mean()
    torch.testing.assert_close(out["kl"], kl)
    torch.testing.assert_close(out["total"], out["ce_teacher"] + 0.5 * out["ce_student"]
                               + 0.1 * out["entropy"] + 2.0 * out["kl"])
    out["total"].backward()
    assert t.grad.abs().sum() > 0 and s.grad.abs().sum() > 0
    # Teacher detached: the KL moves only the student.
    t.grad = None
    confkd_loss(t, s, labels, strong, weak)["kl"].backward()
    assert t.grad is None or t.grad.abs().sum() == 0
    t.grad = None
    confkd_loss(t, s, labels, strong, weak, detach_teacher=False)["kl"].backward()
    assert t.grad.abs().sum() > 0


def test_confkd_kl_zero_when_equal_and_end_to_end_gradient():
    logits = torch.randn(2, 2, 8, 8)
    out = confkd_loss(logits, logits.clone(), torch.full((2, 8, 8), -1), torch.tensor([False, False]),
                      torch.tensor([True, True]))
    assert out["kl"].abs().item() < 1e-6
    assert out["ce_teacher"].item() == 0 and out["ce_student"].item() == 0
    assert out["entropy"].item() > 0

    net = DualDecoderNet(width=4, depth=2)
    x = torch.rand(2, 3, 16, 16)
    labels = torch.randint(0, 2, (2, 16, 16))
    labels[1] = -1
    t, s = net(x)
    confkd_loss(t, s, labels, torch.tensor([True, False]), torch.tensor([False, True]))["total"].backward()
    for part in (net.encoder, net.teacher, net.student):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters())
