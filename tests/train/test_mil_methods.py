from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from napari_wsimil.errors import WsimilError
from napari_wsimil.mil import BagDataset, attention_scores, build, predict
from napari_wsimil.train import get, methods, train
from napari_wsimil.train.engine import binary_auc
from napari_wsimil.mil.training import paired_sampler

from .conftest import make_bags, run_all, small_config


@pytest.mark.parametrize("name", ["abmil", "clam-sb", "clam-mb", "ms-clam"])
def test_learns_tiny_problem_and_attends_to_positives(name):
    data = make_bags(annotate=0.3 if name == "ms-clam" else 0.0)
    epochs = 12 if name == "ms-clam" else 8  # its attention loss spreads attention first, then it catches up
    events, model = run_all(train(build(name, data, None, small_config(name, epochs=epochs))))
    probs, labels = predict(model, data)
    assert binary_auc(probs[:, 1], labels == 1) > 0.9
    # attention: in positive bags the shifted instances rank above the others
    labelled = make_bags(annotate=1.0)  # same seed → same bags, every instance label kept
    aucs = []
    for i in range(len(labelled)):
        bag = labelled[i]
        if bag.label == 1:
            att = attention_scores(model, bag.features)
            row = att[1] if att.shape[0] > 1 else att[0]  # CLAM-MB: the positive class's branch
            aucs.append(binary_auc(row, bag.instance_labels == 1))
    assert np.mean(aucs) > 0.85, aucs


def test_small_bags_do_not_crash():
    data = make_bags(n_bags=12, sizes=(1, 6))
    for name in ["clam-sb", "clam-mb", "ms-clam"]:
        events, _ = run_all(train(build(name, data, None, small_config(name, epochs=2))))
        assert events[-1].kind == "done"


def test_paired_sampler_pairs_and_oversamples():
    data = make_bags(n_bags=40, annotate=0.0)
    bags = [data[i] for i in range(len(data))]
    # annotate one positive slide
    bags[1].instance_labels = torch.zeros(bags[1].features.shape[0], dtype=torch.long)
    data = BagDataset(bags)
    sample = paired_sampler(90.0, 0.9)
    first = sample(data, 1, np.random.default_rng(0))
    assert all(data[a].label == 0 and data[b].label == 1 for a, b in first)
    late = sample(data, 60, np.random.default_rng(0))
    count = lambda steps: sum(b == 1 for _, b in steps)  # noqa: E731
    assert count(first) > 10 * max(1, count(late)) or count(late) <= 2
    assert count(first) >= 10


def test_bags_on_disk(tmp_path):
    data = make_bags(n_bags=10)
    files = []
    for i in range(len(data)):
        p = tmp_path / f"slide{i}.safetensors"
        save_file({"features": data[i].features}, str(p))
        files.append(p)
    disk = BagDataset(files=files, labels=data.labels)
    assert torch.equal(disk[3].features, data[3].features) and disk[3].name == "slide3.safetensors"
    events, _ = run_all(train(build("abmil", disk, None, small_config("abmil", epochs=1))))
    assert events[-1].kind == "done"


def test_registry_documents_every_option():
    assert set(methods()) == {"abmil", "clam-sb", "clam-mb", "ms-clam", "pinchaud", "hybrid", "confkd", "zoommil",
                              "fedmix"}
    assert {n for n, m in methods().items() if m.kind == "segmentation"} == {"pinchaud", "hybrid", "confkd", "fedmix"}
    assert {n for n, m in methods().items() if m.kind == "zoommil"} == {"zoommil"}
    for name, info in methods().items():
        cfg = info.config_cls()
        for f in cfg.__dataclass_fields__:
            assert cfg.doc(f), f"{name}.{f} has no doc"
        assert info.description
    ms = get("ms-clam").config_cls()
    assert (ms.c1, ms.w_att, ms.k_sample, ms.oversample, ms.oversample_decay) == (0.6, 1.0, 8, 90.0, 0.9)
    clam = get("clam-sb").config_cls()
    assert (clam.bag_weight, clam.patience, clam.min_epochs, clam.lr) == (0.7, 20, 50, 2e-4)
    pin = get("pinchaud").config_cls()  # the paper's settings
    assert (pin.beta0, pin.beta1, pin.eta, pin.alpha, pin.width) == (0.0, 1.0, 50.0, 2.0, 32)
    hyb = get("hybrid").config_cls()
    assert (hyb.threshold, hyb.scale, hyb.mix_negative, hyb.mix_pseudo, hyb.mix_fine) == (0.4, 4.0, 0.4, 0.1, 0.5)


def test_reads_feature_bags_written_by_the_features_package(tmp_path):
    from napari_wsimil.features.bags import Bag as FeatureBag

    data = make_bags(n_bags=4)
    files = []
    for i in range(len(data)):
        f = data[i].features.numpy()
        bag = FeatureBag(np.zeros((len(f), 2), np.int64), f, {"encoder": "test"})
        files.append(bag.save(tmp_path / f"s{i}.npz"))
    disk = BagDataset(files=files, labels=data.labels)
    assert torch.equal(disk[2].features, data[2].features) and disk[2].instance_labels is None
    (tmp_path / "broken.npz").write_bytes(b"not a zip")
    with pytest.raises(WsimilError, match="broken.npz"):
        build("abmil", BagDataset(files=[*files, tmp_path / "broken.npz"], labels=[*data.labels, 0]))


@pytest.mark.parametrize("name", ["abmil", "clam-sb", "clam-mb", "ms-clam"])
def test_multiclass_cohort_trains(name):
    bags = [make_bags(n_bags=9, seed=3)[i] for i in range(9)]
    for i, bag in enumerate(bags):
        bag.label = i % 3
    events, model = run_all(train(build(name, BagDataset(bags), None, small_config(name, epochs=1))))
    assert events[-1].kind == "done"
    assert predict(model, BagDataset(bags))[0].shape == (9, 3)
