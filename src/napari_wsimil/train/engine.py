"""The one training loop: a generator that yields :class:`ProgressEvent` and checkpoints every epoch.

Methods (see :mod:`.mil`) differ in their samplers and losses only; seeding, the optimiser, validation,
early stopping, NaN guard, checkpoints and resume live here once.

Determinism: every epoch reseeds torch (dropout) and its own numpy generator (sampling order) from
``(seed, epoch)``, so an epoch's randomness does not depend on what ran before it. That is what makes a
resumed run bit-identical to an uninterrupted one without having to serialise RNG states.

Checkpoints never use pickle: tensors go to ``ckpt-EEEE.safetensors`` (model ``model.*``, optimiser
``optim.*``), everything else to ``last.json``. The JSON is written last and atomically, so it is the commit
point: a kill at any moment leaves the previous JSON pointing at a complete previous tensor file. It also
holds the run's ``history``: one ``{"epoch", "losses", "val_losses"}`` row per completed epoch (mean training
losses, validation losses when validated), so a resumed run's history is exactly its completed epochs.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Generator, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from ..errors import WsimilError, short
from ..io.atomic import write_bytes, write_text
from .events import ProgressEvent

FORMAT_VERSION = 1


class TrainingError(WsimilError):
    """Training cannot start or cannot go on (bad cohort, NaN loss, unusable checkpoint)."""


class CheckpointError(TrainingError, ValueError):
    """Weights that do not fit the model or are not finite (see :func:`check_state_dict`)."""


def doc_field(text: str, **kw: Any) -> Any:
    """A dataclass field with its documentation attached (read by the GUI/CLI to explain options)."""
    return field(metadata={"doc": text}, **kw)


@dataclass
class TrainConfig:
    """Options every method shares. Defaults follow CLAM (Adam 2e-4, wd 1e-5, 200 epochs, patience 20
    after epoch 50)."""

    epochs: int = doc_field("Maximum number of passes over the training bags.", default=200)
    lr: float = doc_field("Learning rate.", default=2e-4)
    weight_decay: float = doc_field("Weight decay (L2).", default=1e-5)
    optimizer: str = doc_field("'adam' (every method's default, as in its paper) or 'sgd' (plain SGD, no "
                               "momentum: federated sites whose updates are averaged, see HistoFL's "
                               "site_optimizer). SGD needs a far larger lr (e.g. 0.1).", default="adam")
    seed: int = doc_field("Seed for weights, dropout and sampling; same seed + same data = same model on the "
                          "same CPU (another CPU can round differently, and some runs then diverge).",
                     default=0)
    early_stopping: bool = doc_field("Stop when the validation loss has not improved for `patience` epochs.",
                                default=True)
    patience: int = doc_field("Epochs without validation improvement tolerated before stopping.", default=20)
    min_epochs: int = doc_field("Never stop early before this epoch (attention models improve late).", default=50)
    lr_plateau_factor: float = doc_field("Multiply the learning rate by this when the validation loss has not "
                                         "improved for `lr_plateau_patience` epochs (ReduceLROnPlateau); 1: "
                                         "never.", default=1.0)
    lr_plateau_patience: int = doc_field("Epochs without validation improvement before the learning rate is "
                                         "reduced.", default=5)
    device: str = doc_field("'auto' (cuda, then mps, then cpu), or a torch device string.", default="auto")
    step_events: int = doc_field("Yield a 'step' event every this many steps (0: none).", default=0)

    def doc(self, name: str) -> str:
        """The documentation of one option."""
        return self.__dataclass_fields__[name].metadata.get("doc", "")


@dataclass
class StepOutput:
    """A training step's losses (``"total"`` is backpropagated) and (probabilities (C,), label) pairs."""

    losses: dict[str, torch.Tensor]
    predictions: list[tuple[torch.Tensor, int]] = field(default_factory=list)


class Method(Protocol):
    """What the engine needs from a method family."""

    name: str
    config: TrainConfig

    def check(self) -> None: ...  # raise TrainingError on a bad cohort, before anything runs
    def build_model(self) -> nn.Module: ...
    def describe(self) -> dict[str, Any]: ...  # JSON: what must match for a resume
    def batches(self, epoch: int, rng: np.random.Generator) -> Iterable[Any]: ...
    def step(self, model: nn.Module, batch: Any, device: torch.device) -> StepOutput: ...
    # (validation losses, metrics) or None; the best checkpoint and early stopping follow the loss "select"
    # when the method gives one, else "bag", else "total".
    def evaluate(self, model: nn.Module,
                 device: torch.device) -> tuple[dict[str, float], dict[str, float]] | None: ...


def pick_device(name: str = "auto") -> torch.device:
    """cuda, then Apple mps, then cpu for 'auto'; anything else is passed to torch."""
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def classification_metrics(probs: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Accuracy and AUC (binary, or macro one-vs-rest); AUC is NaN when a class is missing."""
    if len(labels) == 0:
        return {}
    out = {"accuracy": float((probs.argmax(1) == labels).float().mean())}
    c = probs.shape[1]
    aucs = [binary_auc(probs[:, k], labels == k) for k in ([1] if c == 2 else range(c))]
    out["auc"] = float(np.mean(aucs))
    return out


def binary_auc(scores: torch.Tensor, positive: torch.Tensor) -> float:
    """Mann–Whitney AUC with ties counted as half, from ranks (memory linear in the scores)."""
    from ..infer.metrics import binary_auc as rank_auc

    return rank_auc(scores.detach().double().cpu().numpy(), positive.detach().cpu().numpy())


OPTIMIZERS = ("adam", "sgd")


def make_optimizer(name: str, params: Iterable[torch.nn.Parameter], lr: float,
                   weight_decay: float) -> torch.optim.Optimizer:
    """The optimiser ``TrainConfig.optimizer`` names (why SGD exists: HistoFLConfig.site_optimizer)."""
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)
    raise TrainingError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, not {name!r}")


# ---- checkpoints -------------------------------------------------------------------------------------------

def _flatten_state(model: nn.Module,
                   optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    osd = optimizer.state_dict()
    scalars: dict[str, Any] = {}
    for idx, st in osd["state"].items():
        for key, val in st.items():
            if torch.is_tensor(val):
                tensors[f"optim.{idx}.{key}"] = val.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{key}"] = val
    return tensors, {"param_groups": osd["param_groups"], "scalars": scalars}


def _restore_state(model: nn.Module, optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                   optim_json: dict) -> None:
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    state: dict[int, dict[str, Any]] = {}
    for k, v in tensors.items():
        if k.startswith("optim."):
            _, idx, key = k.split(".", 2)
            state.setdefault(int(idx), {})[key] = v
    for k, v in optim_json["scalars"].items():
        idx, key = k.split(".", 1)
        state.setdefault(int(idx), {})[key] = v
    groups = [{**g, "betas": tuple(g["betas"])} if "betas" in g else g for g in optim_json["param_groups"]]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def save_checkpoint(out_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                    state: dict[str, Any]) -> Path:
    """Write ``ckpt-EEEE.safetensors`` then commit with ``last.json``; older tensor files are removed."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors, optim_json = _flatten_state(model, optimizer)
    name = f"ckpt-{state['epoch']:04d}.safetensors"
    write_bytes(out_dir / name, st_save(tensors, metadata={"epoch": str(state["epoch"])}))
    committed = {**state, "tensors": name, "optimizer": optim_json}
    write_text(out_dir / "last.json", json.dumps(committed, indent=1))
    for old in out_dir.glob("ckpt-*.safetensors"):
        if old.name != name:
            old.unlink(missing_ok=True)
    return out_dir / name


def load_model_weights(path: str | Path, model: nn.Module) -> nn.Module:
    """Load weights from a checkpoint (``*.safetensors``, ``last.json``, ``best.safetensors``) or from a
    user state dict (``*.pt``/``*.pth`` through ``torch.load(weights_only=True)``, never plain pickle)."""
    path = Path(path)
    if path.is_dir():
        path = path / "last.json"
    try:
        if path.suffix == ".json":
            name = json.loads(path.read_text())["tensors"]
            if (not isinstance(name, str) or not name or len(name) > 255 or "/" in name or "\\" in name
                    or "\0" in name or name.startswith(".")):
                raise CheckpointError(f"{path.name} ({path}) names no checkpoint file in its folder "
                                      f"(tensors: {short(repr(name), 60)})")
            path = path.parent / name
        if path.suffix == ".safetensors":
            tensors = st_load(path.read_bytes())
            sd = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")} or tensors
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except CheckpointError:
        raise
    except FileNotFoundError:
        raise CheckpointError(f"the checkpoint {path.name} ({path}) does not exist") from None
    except Exception as exc:  # noqa: BLE001 - safetensors, JSON and unpickler errors all mean "unreadable"
        raise CheckpointError(f"{path.name} ({path}) is not a readable checkpoint: {short(exc)}") from exc
    check_state_dict(sd, model, path)
    model.load_state_dict(sd)
    return model


def check_state_dict(sd: Any, model: nn.Module, path: Path) -> None:
    """Refuse weights that do not fit ``model`` before they touch it: same names, same shapes, floating
    dtypes where the model has them, and finite values. Why: a checkpoint from elsewhere (another method,
    a damaged copy) must fail with a line naming the file, not load half-way or predict NaN everywhere.
    Raises :class:`TrainingError` (also a ``ValueError``, which the run loaders already report)."""
    name = f"{path.name} ({path})"
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{name} does not hold model weights (a mapping of names to tensors)")
    expected = model.state_dict()
    # Buffers a module fills itself when an older checkpoint lacks them (``OPTIONAL_BUFFERS``, e.g. the MIL
    # models' input scaling, which runs saved before it existed load as the identity) are not "missing".
    optional = {f"{name}.{b}" if name else b for name, mod in model.named_modules()
                for b in getattr(mod, "OPTIONAL_BUFFERS", ())}
    missing, extra = sorted(set(expected) - set(sd) - optional), sorted(set(sd) - set(expected))
    if missing or extra:
        raise CheckpointError(f"{name} does not fit this model: {len(missing)} weights missing "
                              f"({', '.join(missing[:3])}{' …' if len(missing) > 3 else ''}), {len(extra)} unknown "
                              f"({', '.join(extra[:3])}{' …' if len(extra) > 3 else ''}); was it trained with "
                              "another method or settings?")
    for key, ref in expected.items():
        if key not in sd:
            continue  # optional, filled by the module itself
        t = sd[key]
        if tuple(t.shape) != tuple(ref.shape):
            raise CheckpointError(f"{name}: weight {key} is {tuple(t.shape)}, the model needs {tuple(ref.shape)}")
        if ref.is_floating_point() and not t.is_floating_point():
            raise CheckpointError(f"{name}: weight {key} is {t.dtype}, the model needs {ref.dtype}")
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise CheckpointError(f"{name}: weight {key} holds NaN or infinite values; the checkpoint is damaged")


# ---- the loop ----------------------------------------------------------------------------------------------

def _seed_epoch(seed: int, epoch: int) -> np.random.Generator:
    torch.manual_seed(seed * 100_003 + epoch)
    return np.random.default_rng([seed, epoch])


def train(method: Method, out_dir: str | Path | None = None, *,
          resume: bool = False) -> Generator[ProgressEvent, None, nn.Module]:
    """Train ``method``, yielding progress events; checkpoints go to ``out_dir`` (none when None).

    With ``resume=True`` and a ``last.json`` in ``out_dir`` training continues after the last completed
    epoch with the saved weights, optimiser state and early-stopping state. Raises :class:`TrainingError`
    for a bad cohort (before any training) and names the epoch when the loss becomes NaN or infinite.
    The generator's return value (``StopIteration.value``, or ``model = yield from train(...)``) is the
    trained model in its final state; the best one by validation loss is ``out_dir/best.safetensors``.
    """
    from .run import claim_run_folder

    lock = None
    try:
        if out_dir is not None:  # one training per run folder (a second one is refused, naming the first)
            try:
                lock = claim_run_folder(Path(out_dir))
            except WsimilError as exc:
                raise TrainingError(str(exc)) from None
        return (yield from _train(method, out_dir, resume))
    finally:  # methods with workers (the segmentation mapper) stop them here, also on errors and cancel
        close = getattr(method, "close", None)
        if close is not None:
            close()
        if lock is not None:
            lock.release()


def _train(method: Method, out_dir: str | Path | None, resume: bool) -> Generator[ProgressEvent, None, nn.Module]:
    cfg = method.config
    method.check()
    out = None if out_dir is None else Path(out_dir)
    device = pick_device(cfg.device)
    torch.manual_seed(cfg.seed)
    model = method.build_model().to(device)
    optimizer = make_optimizer(cfg.optimizer, model.parameters(), cfg.lr, cfg.weight_decay)
    state: dict[str, Any] = {"format": FORMAT_VERSION, "method": method.describe(), "config": asdict(cfg),
                             "epoch": 0, "seed": cfg.seed,
                             "rng": "per epoch: torch.manual_seed(seed*100003+epoch), "
                                    "numpy default_rng([seed, epoch])",
                             "best_val_loss": None, "best_epoch": None,
                             "epochs_since_best": 0, "stopped": None}
    if resume and out is not None and (out / "last.json").exists():
        state = _resume(out, method, model, optimizer, state)
    start = state["epoch"] + 1
    t0 = time.perf_counter()
    if state["stopped"]:
        yield ProgressEvent("done", state["epoch"], total_epochs=cfg.epochs, path=str(out) if out else None,
                            message=f"already finished: {state['stopped']}")
        return model
    for epoch in range(start, cfg.epochs + 1):
        losses: dict[str, float] = {}
        for ev in _run_epoch(method, model, optimizer, device, epoch, cfg, t0, start):
            if ev.kind == "epoch":
                losses = dict(ev.losses)
            yield ev
        model_val = method.evaluate(model, device)
        row: dict[str, Any] = {"epoch": epoch, "losses": losses}
        eta = _eta(t0, epoch - start + 1, cfg.epochs - epoch)
        if model_val is not None:
            vl, vm = model_val
            yield ProgressEvent("validation", epoch, total_epochs=cfg.epochs, losses=vl, metrics=vm,
                                elapsed=time.perf_counter() - t0, eta=eta)
            _update_early_stopping(state, _selection_loss(vl), epoch, cfg, out, model)
            _update_lr_on_plateau(state, _plateau_loss(vl), cfg, optimizer)
            state["val_metrics"] = {k: float(v) for k, v in vm.items()}  # what the runs list shows
            row["val_losses"] = {k: float(v) for k, v in vl.items()}
        state["epoch"] = epoch
        state.setdefault("history", []).append(row)  # committed with the checkpoint: a resume keeps it
        if out is not None:
            path = save_checkpoint(out, model, optimizer, state)
            yield ProgressEvent("checkpoint", epoch, total_epochs=cfg.epochs,
                                elapsed=time.perf_counter() - t0, eta=eta, path=str(path))
        if state["stopped"]:
            break
    if not state["stopped"]:
        state["stopped"] = "finished"
        if out is not None:
            save_checkpoint(out, model, optimizer, state)
    if out is not None and state["best_epoch"] is None:  # no validation: the last model is the one to use
        write_bytes(out / "best.safetensors", st_save({f"model.{k}": v.detach().cpu().contiguous()
                                                       for k, v in model.state_dict().items()}))
    # Methods that derive something from the final best model (segmentation: its operating threshold) do it
    # here, in the same worker, so that "done" means the run is complete.
    finish = getattr(method, "finish", None)
    note = finish(out) if out is not None and finish is not None else None
    yield ProgressEvent("done", state["epoch"], total_epochs=cfg.epochs, elapsed=time.perf_counter() - t0,
                        eta=0.0, path=str(out) if out else None,
                        message=state["stopped"] + (f"; {note}" if note else ""),
                        metrics={"best_epoch": float(state["best_epoch"] or state["epoch"])})
    return model


def _eta(t0: float, done: int, left: int) -> float | None:
    return None if done <= 0 else (time.perf_counter() - t0) / done * left


def _run_epoch(method: Method, model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device,
               epoch: int, cfg: TrainConfig, t0: float, start: int) -> Iterator[ProgressEvent]:
    rng = _seed_epoch(cfg.seed, epoch)
    model.train()
    sums: dict[str, float] = {}
    probs, labels = [], []
    batches = method.batches(epoch, rng)
    if not hasattr(batches, "__len__"):  # a sized iterable may stream (segmentation patches are read ahead)
        batches = list(batches)
    for i, batch in enumerate(batches, 1):
        out = method.step(model, batch, device)
        total = out.losses["total"]
        if not torch.isfinite(total):
            raise TrainingError(
                f"training stopped at epoch {epoch}, step {i}: the loss became {float(total.detach())}. "
                "Lower the learning rate, or check the feature bags for NaN/inf values; the last good "
                "checkpoint is kept.")
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()
        for k, v in out.losses.items():
            sums[k] = sums.get(k, 0.0) + float(v.detach())
        for p, y in out.predictions:
            probs.append(p.detach().cpu())
            labels.append(y)
        if cfg.step_events and i % cfg.step_events == 0:
            frac = (epoch - start) + i / len(batches)
            left = (cfg.epochs - epoch) + (1 - i / len(batches))
            step_losses = {k: float(v.detach()) for k, v in out.losses.items()}
            yield ProgressEvent("step", epoch, i, cfg.epochs, step_losses,
                                elapsed=time.perf_counter() - t0,
                                eta=(time.perf_counter() - t0) / frac * left)
    n = max(len(batches), 1)
    metrics = classification_metrics(torch.stack(probs), torch.tensor(labels)) if probs else {}
    mean_losses = {k: v / n for k, v in sums.items()}
    yield ProgressEvent("epoch", epoch, len(batches), cfg.epochs, mean_losses, metrics,
                        time.perf_counter() - t0, _eta(t0, epoch - start + 1, cfg.epochs - epoch))


def _selection_loss(losses: dict[str, float]) -> float:
    for key in ("select", "bag", "total"):
        if key in losses:
            return float(losses[key])
    return math.inf


def _plateau_loss(losses: dict[str, float]) -> float:
    """The learning rate follows the validation *loss* (as ZoomMIL's and torch's ReduceLROnPlateau do), even
    where a method selects its checkpoint by another figure ("select": weighted F1, Dice)."""
    for key in ("bag", "total", "select"):
        if key in losses:
            return float(losses[key])
    return math.inf


def _update_early_stopping(state: dict[str, Any], val_loss: float, epoch: int, cfg: TrainConfig,
                           out: Path | None, model: nn.Module) -> None:
    """CLAM's rule: keep the best model by validation loss; stop after `patience` epochs without a better one,
    never before `min_epochs`."""
    best = state["best_val_loss"]
    if best is None or val_loss < best:
        state.update(best_val_loss=val_loss, best_epoch=epoch, epochs_since_best=0)
        if out is not None:
            write_bytes(out / "best.safetensors", st_save(
                {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
                metadata={"epoch": str(epoch)}))
    else:
        state["epochs_since_best"] += 1
    if cfg.early_stopping and epoch >= cfg.min_epochs and state["epochs_since_best"] >= cfg.patience:
        state["stopped"] = (f"early stopping at epoch {epoch} "
                            f"(best validation loss at epoch {state['best_epoch']})")


def _update_lr_on_plateau(state: dict[str, Any], val_loss: float, cfg: TrainConfig,
                          optimizer: torch.optim.Optimizer) -> None:
    """torch's ReduceLROnPlateau (mode min, relative threshold 1e-4, no cooldown), its state kept in
    ``state`` (last.json) so that a resumed run reduces at the same epochs; the reduced rate itself is in
    the optimiser's saved state."""
    if cfg.lr_plateau_factor >= 1.0:
        return
    plateau = state.setdefault("lr_plateau", {"best": None, "bad_epochs": 0})
    if plateau["best"] is None or val_loss < plateau["best"] * (1 - 1e-4):
        plateau.update(best=val_loss, bad_epochs=0)
        return
    plateau["bad_epochs"] += 1
    if plateau["bad_epochs"] > cfg.lr_plateau_patience:
        for group in optimizer.param_groups:
            group["lr"] = group["lr"] * cfg.lr_plateau_factor
        plateau["bad_epochs"] = 0
        state["lr"] = float(optimizer.param_groups[0]["lr"])


def _resume(out: Path, method: Method, model: nn.Module, optimizer: torch.optim.Optimizer,
            fresh: dict[str, Any]) -> dict[str, Any]:
    try:
        saved = json.loads((out / "last.json").read_text())
        tensors = st_load((out / saved["tensors"]).read_bytes())
    except (OSError, ValueError, KeyError) as e:
        raise TrainingError(f"cannot resume from {out / 'last.json'}: "
                            f"the checkpoint is unreadable ({e})") from e
    if saved.get("method") != fresh["method"]:
        raise TrainingError(f"cannot resume from {out}: it was trained with {saved.get('method')}, "
                            f"not {fresh['method']}. Use another output folder or resume=False.")
    check_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")}, model,
                     out / saved["tensors"])
    was = saved.get("config", {}).get("optimizer", "adam")
    if was != method.config.optimizer:
        raise TrainingError(f"cannot resume from {out}: it was trained with the {was} optimizer, not "
                            f"{method.config.optimizer}. Use another output folder or the same optimizer.")
    _restore_state(model, optimizer, tensors, saved.pop("optimizer"))
    saved.pop("tensors", None)
    if saved.get("stopped") == "finished" and saved["epoch"] < method.config.epochs:
        saved["stopped"] = None  # more epochs were asked for than the first run had
    saved["config"] = fresh["config"]
    return saved
