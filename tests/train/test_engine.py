from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from napari_wsimil.errors import WsimilError
from napari_wsimil.models import ABMIL
from napari_wsimil.mil import BagDataset, build
from napari_wsimil.train import load_model_weights, train
from napari_wsimil.train.engine import pick_device

from .conftest import make_bags, run_all, small_config


def _weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_events_kinds_and_eta(tmp_path):
    data, val = make_bags(n_bags=10), make_bags(n_bags=6, seed=1)
    cfg = small_config("clam-sb", epochs=3, step_events=5)
    events, _ = run_all(train(build("clam-sb", data, val, cfg), tmp_path))
    kinds = [e.kind for e in events]
    assert set(kinds) == {"step", "epoch", "validation", "checkpoint", "done"}
    assert kinds[-1] == "done" and events[-1].message == "finished"
    per_epoch = [e for e in events if e.kind == "epoch"]
    assert [e.epoch for e in per_epoch] == [1, 2, 3]
    assert {"total", "bag", "instance"} <= set(per_epoch[0].losses) and "auc" in per_epoch[0].metrics
    assert per_epoch[-1].eta == 0.0 and per_epoch[0].eta > 0
    assert all(e.eta is not None and e.eta >= 0 and e.elapsed >= 0 for e in events)
    assert all(e.total_epochs == 3 for e in events)
    val_events = [e for e in events if e.kind == "validation"]
    assert len(val_events) == 3 and "bag" in val_events[0].losses and "auc" in val_events[0].metrics
    steps = [e for e in events if e.kind == "step"]
    assert [e.step for e in steps[:2]] == [5, 10]


def test_checkpoint_is_safetensors_and_json(tmp_path):
    data = make_bags(n_bags=6)
    _, model = run_all(train(build("abmil", data, None, small_config("abmil", epochs=2)), tmp_path))
    state = json.loads((tmp_path / "last.json").read_text())
    assert state["epoch"] == 2 and state["seed"] == 0 and state["stopped"] == "finished"
    assert state["method"] == {"name": "abmil", "in_dim": 32, "n_classes": 2}
    tensors = load_file(str(tmp_path / state["tensors"]))
    assert any(k.startswith("optim.") for k in tensors) and any(k.startswith("model.") for k in tensors)
    assert sorted(p.name for p in tmp_path.glob("ckpt-*")) == ["ckpt-0002.safetensors"]  # old ones removed
    fresh = ABMIL(32, 2, hidden=64, attn_hidden=32)
    assert _same(_weights(load_model_weights(tmp_path, fresh)), _weights(model))
    assert _same(_weights(load_model_weights(tmp_path / "best.safetensors", fresh)), _weights(model))
    torch.save(model.state_dict(), tmp_path / "user.pt")  # a user state dict, read with weights_only=True
    assert _same(_weights(load_model_weights(tmp_path / "user.pt", ABMIL(32, 2, 64, 32))), _weights(model))


@pytest.mark.parametrize("name", ["clam-sb", "ms-clam"])
def test_determinism(name):
    data = make_bags(n_bags=12, annotate=0.5)
    _, a = run_all(train(build(name, data, None, small_config(name, epochs=2))))
    _, b = run_all(train(build(name, data, None, small_config(name, epochs=2))))
    assert _same(_weights(a), _weights(b))
    _, c = run_all(train(build(name, data, None, small_config(name, epochs=2, seed=1))))
    assert not _same(_weights(a), _weights(c))


@pytest.mark.parametrize("name", ["clam-mb", "ms-clam"])
def test_kill_and_resume_equals_uninterrupted(tmp_path, name):
    data, val = make_bags(n_bags=12, annotate=0.5), make_bags(n_bags=6, seed=1)
    cfg = lambda: small_config(name, epochs=4)  # noqa: E731
    _, full = run_all(train(build(name, data, val, cfg()), tmp_path / "full"))

    gen = train(build(name, data, val, cfg()), tmp_path / "killed")
    for ev in gen:
        if ev.kind == "checkpoint" and ev.epoch == 2:
            break  # the process "dies" here: the generator is abandoned
    gen.close()
    assert json.loads((tmp_path / "killed" / "last.json").read_text())["epoch"] == 2

    events, resumed = run_all(train(build(name, data, val, cfg()), tmp_path / "killed", resume=True))
    assert events[0].epoch == 3
    assert [e.epoch for e in events if e.kind == "epoch"] == [3, 4]
    assert _same(_weights(resumed), _weights(full))
    a = json.loads((tmp_path / "full" / "last.json").read_text())
    b = json.loads((tmp_path / "killed" / "last.json").read_text())
    assert (a["best_val_loss"], a["best_epoch"]) == (b["best_val_loss"], b["best_epoch"])

    # resuming a finished run does nothing more
    again, _ = run_all(train(build(name, data, val, cfg()), tmp_path / "killed", resume=True))
    assert [e.kind for e in again] == ["done"]


def test_resume_refuses_another_method(tmp_path):
    data = make_bags(n_bags=6)
    run_all(train(build("abmil", data, None, small_config("abmil", epochs=1)), tmp_path))
    with pytest.raises(WsimilError, match="abmil"):
        run_all(train(build("clam-sb", data, None, small_config("clam-sb", epochs=2)), tmp_path, resume=True))


def test_plain_sgd_is_one_option_its_step_is_minus_lr_times_the_gradient_and_resume_keeps_it(tmp_path):
    from napari_wsimil.train.engine import make_optimizer

    w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = make_optimizer("sgd", [w], 0.1, 0.0)
    (w ** 2).sum().backward()  # gradient 2w
    opt.step()
    assert torch.allclose(w.detach(), torch.tensor([0.8, -1.6]))
    with pytest.raises(WsimilError, match="optimizer must be one of adam, sgd"):
        make_optimizer("rmsprop", [w], 0.1, 0.0)
    data = make_bags(n_bags=6)
    run_all(train(build("abmil", data, None, small_config("abmil", epochs=1, optimizer="sgd", lr=0.05)), tmp_path))
    tensors = load_file(str(tmp_path / json.loads((tmp_path / "last.json").read_text())["tensors"]))
    assert not any(k.startswith("optim.") for k in tensors)  # plain SGD keeps no state (Adam: exp_avg, ...)
    run_all(train(build("abmil", data, None, small_config("abmil", epochs=2, optimizer="sgd", lr=0.05)), tmp_path,
                  resume=True))
    with pytest.raises(WsimilError, match="trained with the sgd optimizer, not adam"):
        run_all(train(build("abmil", data, None, small_config("abmil", epochs=3)), tmp_path, resume=True))


def test_early_stopping_waits_for_min_epochs(tmp_path):
    data, val = make_bags(n_bags=6), make_bags(n_bags=4, seed=1)
    # lr 0: validation loss never improves after epoch 1
    cfg = small_config("abmil", epochs=30, lr=0.0, patience=2, min_epochs=5)
    events, _ = run_all(train(build("abmil", data, val, cfg), tmp_path))
    assert max(e.epoch for e in events if e.kind == "epoch") == 5
    assert "early stopping at epoch 5" in events[-1].message and "epoch 1" in events[-1].message
    assert (tmp_path / "best.safetensors").exists()


def test_nan_loss_stops_with_the_epoch(tmp_path):
    data = make_bags(n_bags=6)
    method = build("abmil", data, None, small_config("abmil", epochs=5))
    real, calls = method.loss, {"n": 0}

    def poisoned(out, bag):
        calls["n"] += 1
        losses = real(out, bag)
        if calls["n"] > 6:  # epoch 2, step 1
            losses["total"] = losses["total"] * float("nan")
        return losses

    method.loss = poisoned
    with pytest.raises(WsimilError, match="epoch 2"):
        run_all(train(method, tmp_path))
    assert json.loads((tmp_path / "last.json").read_text())["epoch"] == 1  # last good checkpoint kept


def _bad(**change):
    bags = [make_bags(n_bags=4)[i] for i in range(4)]
    for k, v in change.items():
        setattr(bags[0], k, v)
    return BagDataset(bags)


@pytest.mark.parametrize("data, message", [
    (BagDataset([]), "no slides"),
    (BagDataset([make_bags(n_bags=4)[i] for i in (0, 2)]), "only class"),
    (_bad(features=torch.zeros(0, 32)), "empty"),
    (_bad(features=torch.full((5, 32), float("nan"))), "NaN"),
    (_bad(label=5), "label 5, outside"),
    (_bad(instance_labels=torch.tensor([3] * 30)), "instance labels"),
])
def test_bad_cohorts_fail_before_training(tmp_path, data, message):
    cfg = small_config("clam-sb", epochs=1, n_classes=2)
    with pytest.raises(WsimilError, match=message):
        next(train(build("clam-sb", data, None, cfg), tmp_path))
    assert not (tmp_path / "last.json").exists()


def test_bad_options_are_errors():
    with pytest.raises(WsimilError, match="no option"):
        small_config("abmil", k_sample=4)
    with pytest.raises(WsimilError, match="unknown method"):
        build("clam-xl", make_bags(n_bags=4))


def test_pick_device():
    assert pick_device("cpu").type == "cpu"
    assert pick_device("auto").type in {"cuda", "mps", "cpu"}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")
def test_trains_on_cuda(tmp_path):
    data = make_bags(n_bags=8, annotate=0.5)
    for name in ["clam-mb", "ms-clam"]:
        events, model = run_all(train(build(name, data, data, small_config(name, epochs=2, device="cuda")),
                                      tmp_path / name))
        assert events[-1].kind == "done" and next(model.parameters()).is_cuda
        fresh = build(name, data, None, small_config(name)).make_model(32, 2)
        load_model_weights(tmp_path / name, fresh)  # CPU model from a GPU checkpoint


def _scripted(config_kwargs: dict, val_losses):
    """A do-nothing method whose validation losses are scripted by ``val_losses(epoch)``: the engine's
    bookkeeping (plateaus, the kept checkpoint) is then exactly predictable."""
    import numpy as np
    import torch
    from torch import nn

    from napari_wsimil.train.engine import StepOutput, TrainConfig

    class Scripted:
        name = "scripted"

        def __init__(self, **overrides) -> None:
            self.config = TrainConfig(**{**config_kwargs, **overrides})
            self.epoch = 0

        def check(self) -> None:
            pass

        def build_model(self) -> nn.Module:
            return nn.Linear(1, 1)

        def describe(self) -> dict:
            return {"name": self.name}

        def batches(self, epoch: int, rng: np.random.Generator) -> list:
            return [0]

        def step(self, model: nn.Module, batch: object, device: torch.device) -> StepOutput:
            return StepOutput({"total": model(torch.ones(1, 1)).sum() * 0.0})

        def evaluate(self, model: nn.Module, device: torch.device) -> tuple[dict, dict]:
            self.epoch += 1
            return val_losses(self.epoch), {}

    return Scripted


def test_learning_rate_is_reduced_on_a_plateau_and_resumes_reduced(tmp_path) -> None:
    """lr_plateau_factor: a validation loss that never improves reduces the rate after patience + 1 epochs
    (torch's ReduceLROnPlateau), and a resumed run continues with the reduced rate and the same counter."""
    import json

    from napari_wsimil.train.engine import train

    flat = _scripted(dict(lr=1.0, early_stopping=False, lr_plateau_factor=0.5, lr_plateau_patience=2,
                          device="cpu"), lambda epoch: {"bag": 1.0})  # never better than the first epoch
    list(train(flat(epochs=4), tmp_path))
    state = json.loads((tmp_path / "last.json").read_text())
    assert state["lr"] == 0.5 and state["lr_plateau"]["bad_epochs"] == 0  # epochs 2, 3, 4 bad: reduced at 4
    list(train(flat(epochs=7), tmp_path, resume=True))
    state = json.loads((tmp_path / "last.json").read_text())
    assert state["epoch"] == 7 and state["lr"] == 0.25


def test_checkpoint_follows_select_while_the_learning_rate_follows_the_loss(tmp_path) -> None:
    """A method that selects by another figure (ZoomMIL's weighted F1, segmentation's Dice) gives "select";
    the kept checkpoint follows it, but ReduceLROnPlateau steps on the validation loss, as the reference's
    trainer does (scheduler.step(val_loss), saver on the metric)."""
    import json

    from napari_wsimil.train.engine import train

    # epoch 1..5: "select" better every epoch, the loss worse every epoch
    scripted = _scripted(dict(epochs=5, lr=1.0, early_stopping=False, lr_plateau_factor=0.5,
                              lr_plateau_patience=2, device="cpu"),
                         lambda epoch: {"bag": float(epoch), "select": 0.6 - 0.1 * epoch})
    list(train(scripted(), tmp_path))
    state = json.loads((tmp_path / "last.json").read_text())
    assert state["best_epoch"] == 5  # by "select", although the loss was worst there
    assert state["lr"] == 0.5  # the loss never improved after epoch 1: reduced once (epochs 2, 3, 4 bad)
