from __future__ import annotations

import math

import pytest
import torch

from napari_wsimil.models import (ABMIL, CLAMMB, CLAMSB, GatedAttention, ms_clam_attention_loss,
                                  normalised_entropy, smooth_top1_svm)

MODELS = [ABMIL, CLAMSB, CLAMMB, lambda d, c: CLAMSB(d, c, instance_mode="ms-clam")]


@pytest.mark.parametrize("make", MODELS, ids=["abmil", "clam-sb", "clam-mb", "ms-clam"])
@pytest.mark.parametrize("n_classes", [2, 3])
@pytest.mark.parametrize("n", [1, 3, 10, 40])  # 10 < 2·k_sample
def test_shapes_and_attention(make, n_classes, n):
    torch.manual_seed(0)
    model = make(16, n_classes)
    out = model(torch.randn(n, 16), label=1, instance_labels=None)
    k = n_classes if isinstance(model, CLAMMB) else 1
    assert out.logits.shape == (n_classes,)
    assert out.attention.shape == out.attention_raw.shape == (k, n)
    torch.testing.assert_close(out.attention.sum(1), torch.ones(k))
    if isinstance(model, ABMIL) or n == 1:  # one instance: nothing to contrast, bag loss only
        assert out.instance_loss is None
    else:
        assert out.instance_loss is not None and torch.isfinite(out.instance_loss)
        out.instance_loss.backward()  # gradients reach the instance classifiers


def test_no_label_no_instance_loss():
    assert CLAMSB(8, 2)(torch.randn(20, 8)).instance_loss is None


def test_ms_clam_has_one_shared_instance_classifier():
    assert len(CLAMSB(8, 3, instance_mode="ms-clam").instance_classifiers) == 1
    assert len(CLAMSB(8, 3).instance_classifiers) == 3
    assert len(CLAMMB(8, 3).classifiers) == 3


def test_gated_attention_raw_shape():
    assert GatedAttention(12, 6, 3)(torch.randn(5, 12)).shape == (3, 5)


def test_smooth_top1_svm_by_hand():
    logits = torch.tensor([[1.0, 2.0], [0.5, -1.0], [0.0, 0.0, 3.0]][:2])
    target = torch.tensor([0, 0])
    # row 1: tau·log(exp(0) + exp(2+1-1)) ; row 2: log(exp(0) + exp(-1+1-0.5))
    expected = (math.log(1 + math.exp(2)) + math.log(1 + math.exp(-0.5))) / 2
    assert smooth_top1_svm(logits, target).item() == pytest.approx(expected, rel=1e-6)
    # tau scales the temperature: tau·log Σ exp(z/tau)
    tau = 0.5
    e2 = tau * math.log(math.exp(0) + math.exp(2 / tau))
    assert smooth_top1_svm(logits[:1], target[:1], tau=tau).item() == pytest.approx(e2, rel=1e-6)


def test_ms_clam_attention_loss():
    uniform = torch.full((8,), 1 / 8)
    assert ms_clam_attention_loss(uniform, 0, None).item() == pytest.approx(-1.0)  # max entropy
    assert normalised_entropy(torch.ones(1)).item() == 0.0
    assert ms_clam_attention_loss(uniform, 1, None).item() == 0.0  # positive, no tile labels
    labels = torch.tensor([1, 1, 0, 0, 0, 0, -1, -1])
    a = torch.tensor([0.5, 0.5, 0, 0, 0, 0, 0, 0])
    # all on tumour, spread evenly: 0 − 1 − 1
    assert ms_clam_attention_loss(a, 1, labels).item() == pytest.approx(-2.0, abs=1e-6)
