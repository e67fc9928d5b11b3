"""The server's round loop, apart from how messages travel (Flower in production, direct calls in tests).

Per round: wait for ``min_sites`` sites, send the global weights, take the replies that came back in time,
check each update (the same tensors as the global model, the same shapes, finite values, a positive example
count, finite numbers) and reject a bad one with a logged reason, aggregate the rest when at least
``min_sites`` are valid, and commit the round to the run folder (checkpoint, ``last.json``, ``run.json`` with
the round's per-site metrics, rejections, bytes and seconds). A round with too few valid updates is tried
again (a killed site is then simply missing); ``--resume`` starts after the last committed round.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ..errors import WsimilError
from ..io.atomic import write_text
from .protocol import Arrays, FederatedMethod, SiteUpdate

Report = Callable[[str], None]


@dataclass
class Reply:
    """One site's answer to a message: its update (``train``) or metrics (``evaluate``), or an error."""

    site: str
    update: SiteUpdate | None = None
    error: str | None = None
    nbytes: int = 0
    left: bool = False  # the site is gone (no heartbeat): no answer, not a refused update


class Transport(Protocol):
    """How the server reaches the sites."""

    def sites(self) -> list[Any]: ...  # the connected sites' handles, now
    def exchange(self, sites: Sequence[Any], kind: str, arrays: Arrays, config: dict[str, Any],
                 server_round: int, timeout: float) -> list[Reply]: ...


@dataclass
class ServerSettings:
    rounds: int
    min_sites: int = 2
    #: sites to wait for before this server's first round (Flower's ``min_available_nodes``); later rounds and
    #: the valid updates a round needs are ``min_sites``. None: ``min_sites``. Without it, a federation that may
    #: go on with fewer sites would start its first round with whichever site connected first.
    start_sites: int | None = None
    round_timeout: float = 600.0
    wait_timeout: float = 600.0
    max_retries: int = 3
    resume: bool = False
    seed: int = 0
    evaluate_last: bool = True


def arrays_nbytes(arrays: Arrays) -> int:
    return int(sum(np.asarray(v).nbytes for v in arrays.values()))


def check_update(update: SiteUpdate, reference: Arrays) -> str | None:
    """Why ``update`` cannot be aggregated with ``reference``'s tensors, or None when it can."""
    missing = sorted(set(reference) - set(update.arrays))
    extra = sorted(set(update.arrays) - set(reference))
    if missing or extra:
        return (f"its tensors differ from the global model's (missing {missing[:3]}, unexpected {extra[:3]})")
    for k, ref in reference.items():
        a = np.asarray(update.arrays[k])
        if a.shape != ref.shape:
            return f"tensor {k} has shape {a.shape}, the global model's {ref.shape}"
        if a.dtype.kind not in "fiu":
            return f"tensor {k} is not numeric ({a.dtype})"
        if a.dtype.kind == "f" and not bool(np.isfinite(a).all()):
            return f"tensor {k} holds NaN or infinite values"
    if not (isinstance(update.num_examples, int) and update.num_examples >= 1):
        return f"its example count {update.num_examples!r} is not a positive whole number"
    bad = [k for k, v in update.metrics.items() if not (isinstance(v, (int, float)) and math.isfinite(v))]
    if bad:
        return f"its metrics {bad[:3]} are not finite numbers"
    return None


def _mean_loss(updates: list[SiteUpdate]) -> float | None:
    """The sites' mean local training loss (``train_loss``, or FedMix's ``loss``); None when none reported."""
    values = [u.metrics.get("train_loss", u.metrics.get("loss")) for u in updates]
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def _weighted(values: list[tuple[float, float]]) -> float | None:
    total = sum(w for _, w in values)
    return None if not values or total <= 0 else sum(v * w for v, w in values) / total


def run_server(method: FederatedMethod, config: Any, out: Path, transport: Transport, settings: ServerSettings,
               report: Report | None = None) -> dict[str, Any]:
    """Run the federation into ``out``; returns the final run.json."""
    from dataclasses import asdict

    say = report or (lambda _m: None)
    out = Path(out)
    if settings.rounds < 1 or settings.min_sites < 1:
        raise WsimilError("--rounds and --min-sites must be at least 1")
    if settings.start_sites is not None and settings.start_sites < settings.min_sites:
        raise WsimilError(f"--start-sites ({settings.start_sites}) cannot be fewer than --min-sites "
                          f"({settings.min_sites})")
    if (out / "last.json").exists() and not settings.resume:
        raise WsimilError(f"{out} already holds a federated run; add --resume to continue it or choose another "
                          "--out")
    if settings.resume and (out / "last.json").exists():
        arrays, done, history = method.read_round(out)
        info = json.loads((out / "run.json").read_text())
        say(f"resuming {out} after round {done}")
    else:
        arrays, done, history = method.initial_arrays(config), 0, []
        info = method.run_info(config, [], getattr(config, "classes", []) or [])
        info["rounds"] = []
    info["server"] = {"rounds": settings.rounds, "min_sites": settings.min_sites,
                      "round_timeout": settings.round_timeout}
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "run.json", json.dumps(info, indent=1))
    cfg_json = asdict(config)
    # a method that chooses its checkpoint and threshold from the sites' summed numbers (FedMix)
    chooser = method.best_round(out, config, info.get("best")) if hasattr(method, "best_round") else None
    best = min((r["global_val_loss"] for r in info["rounds"] if r.get("global_val_loss") is not None), default=None)
    previous = arrays
    for r in range(done + 1, settings.rounds + 1):
        need = (settings.start_sites or settings.min_sites) if r == done + 1 else settings.min_sites
        row, updates = _one_round(method, config, cfg_json, arrays, r, transport, settings, say, need)
        rng = np.random.default_rng([settings.seed, r])
        new = method.aggregate(arrays, updates, config, rng)
        # the sites measured the global model they received (round r-1's) on their validation slides
        loss = _weighted([(u.metrics["global_val_bag"], u.metrics.get("n_val", 1.0)) for u in updates
                          if "global_val_bag" in u.metrics and u.metrics.get("n_val", 1.0) > 0])
        if chooser is not None:
            validation = chooser.after_round(previous, r, [u.metrics for u in updates])
            if validation is not None and info["rounds"]:
                info["rounds"][-1]["validation"] = validation
            info["best"] = chooser.best
            row["sites"] = {k: _numbers_only(v) for k, v in row["sites"].items()}
        if loss is not None and r > 1:
            info["rounds"][-1]["global_val_loss"] = loss
            if (best is None or loss < best) and hasattr(method, "write_best"):
                best = loss
                method.write_best(out, previous, r - 1)
        previous = arrays = new
        info["rounds"].append(row)
        history.append({"epoch": r, "round": r, "losses": row["losses"]})
        info["sites"] = sorted({s for rr in info["rounds"] for s in rr["sites"]})
        method.write_round(out, arrays, r, config, history)
        write_text(out / "run.json", json.dumps(info, indent=1))
        loss_text = "n/a" if row["losses"]["total"] is None else f"{row['losses']['total']:.4f}"
        say(f"round {r}/{settings.rounds}: {len(updates)} site(s), mean loss {loss_text}, {row['seconds']:.1f} s, "
            f"{row['bytes_sent'] + row['bytes_received']} bytes")
    if chooser is not None and settings.evaluate_last and done < settings.rounds:
        final: dict[str, Any] = {}

        def measure(a: Arrays) -> list[dict[str, float]]:
            replies = transport.exchange(transport.sites(), "evaluate", a, cfg_json, settings.rounds,
                                         settings.round_timeout)
            got = {rep.site: rep.update.metrics for rep in replies if rep.update is not None}
            final.setdefault("last", got)
            return list(got.values())

        validation, point = chooser.finish(arrays, settings.rounds, measure)
        info["rounds"][-1]["final_evaluation"] = {k: _numbers_only(v) for k, v in final.get("last", {}).items()}
        if validation is not None:
            info["rounds"][-1]["validation"] = validation
        info["best"], info["operating_point"] = chooser.best, point
        write_text(out / "run.json", json.dumps(info, indent=1))
    elif settings.evaluate_last and done < settings.rounds:
        replies = transport.exchange(transport.sites(), "evaluate", arrays, cfg_json, settings.rounds,
                                     settings.round_timeout)
        final = {rep.site: rep.update.metrics for rep in replies if rep.update is not None}
        info["rounds"][-1]["final_evaluation"] = final
        loss = _weighted([(m["val_bag"], m.get("n_val", 1.0)) for m in final.values() if "val_bag" in m])
        if loss is not None:
            info["rounds"][-1]["global_val_loss"] = loss
            if (best is None or loss < best) and hasattr(method, "write_best"):
                method.write_best(out, arrays, settings.rounds)
        write_text(out / "run.json", json.dumps(info, indent=1))
    return info


def _numbers_only(metrics: dict[str, Any]) -> dict[str, Any]:
    """A site's metrics without the histograms a method may send for the server to sum (FedMix's
    :mod:`.fedmix_validation`): run.json keeps the sums, not 768 numbers per site and round."""
    from .fedmix_validation import numbers_only

    return numbers_only(metrics)


def _one_round(method: FederatedMethod, config: Any, cfg_json: dict[str, Any], arrays: Arrays, r: int,
               transport: Transport, settings: ServerSettings, say: Report, need: int
               ) -> tuple[dict[str, Any], list[SiteUpdate]]:
    for attempt in range(1, settings.max_retries + 1):
        t0 = time.perf_counter()
        sites = _wait_for_sites(transport, settings, say, need if attempt == 1 else settings.min_sites)
        replies = transport.exchange(sites, "train", arrays, cfg_json, r, settings.round_timeout)
        good: list[tuple[str, SiteUpdate]] = []
        rejected: dict[str, str] = {}
        left = sorted(rep.site for rep in replies if rep.left)
        for name in left:
            say(f"round {r}: site {name} left the federation during the round (no heartbeat); the round goes on "
                "without it")
        replies = [rep for rep in replies if not rep.left]
        for rep in replies:
            reason = rep.error if rep.update is None else check_update(rep.update, arrays)
            if reason is None and rep.update is not None:
                good.append((rep.site, rep.update))
            else:
                rejected[rep.site] = reason or "no update"
                say(f"round {r}: the update of site {rep.site} is rejected: {reason}")
        answered = {rep.site for rep in replies}
        silent = len(sites) - len(answered) - len(left)
        if silent > 0:
            say(f"round {r}: {silent} site(s) did not answer within {settings.round_timeout:g} s")
        if len(good) >= settings.min_sites:
            weights = (method.weights([u for _, u in good], config) if hasattr(method, "weights")
                       else np.full(len(good), 1.0 / len(good)))
            sent = arrays_nbytes(arrays) * len(sites)
            row = {"round": r, "attempt": attempt, "seconds": time.perf_counter() - t0,
                   "bytes_sent": sent, "bytes_received": int(sum(rep.nbytes for rep in replies)),
                   "sites": {name: {"num_examples": u.num_examples, "weight": float(w), **u.metrics}
                             for (name, u), w in zip(good, weights)},
                   "rejected": rejected, "silent": silent, "left": left,
                   "losses": {"total": _mean_loss([u for _, u in good])}}
            return row, [u for _, u in good]
        say(f"round {r}: only {len(good)} valid update(s), {settings.min_sites} needed; trying the round again "
            f"({attempt}/{settings.max_retries})")
    raise WsimilError(f"round {r} got fewer than {settings.min_sites} valid updates {settings.max_retries} times; "
                      "the run stops here (its last completed round is kept: --resume continues it)")


def _wait_for_sites(transport: Transport, settings: ServerSettings, say: Report, need: int) -> list[Any]:
    """The connected sites once ``need`` of them are (``--start-sites`` before the first round, else
    ``--min-sites``)."""
    t0 = time.monotonic()
    told = False
    flag = "--start-sites" if need != settings.min_sites else "--min-sites"
    while True:
        sites = transport.sites()
        if len(sites) >= need:
            return sites
        if time.monotonic() - t0 > settings.wait_timeout:
            raise WsimilError(f"only {len(sites)} site(s) connected after {settings.wait_timeout:g} s, "
                              f"{need} needed ({flag})")
        if not told:
            say(f"waiting for {need} site(s) ({len(sites)} connected)")
            told = True
        time.sleep(0.5)


class LocalTransport:
    """Every site's trainer in this process, called directly: the same protocol without a network (tests of
    the round loop, quick benchmarks). ``sites`` maps a site's name to its :class:`SiteTrainer`."""

    def __init__(self, sites: dict[str, Any]):
        self.trainers = dict(sites)

    def sites(self) -> list[Any]:
        return list(self.trainers)

    def exchange(self, sites: Sequence[Any], kind: str, arrays: Arrays, config: dict[str, Any],
                 server_round: int, timeout: float) -> list[Reply]:
        replies = []
        for name in sites:
            trainer = self.trainers[name]
            try:
                if kind == "train":
                    upd = trainer.fit(arrays, server_round)
                else:
                    upd = SiteUpdate({}, 1, trainer.evaluate(arrays))
            except WsimilError as exc:
                replies.append(Reply(name, error=str(exc)))
                continue
            replies.append(Reply(name, upd, nbytes=arrays_nbytes(upd.arrays)))
        return replies


__all__ = ["LocalTransport", "Reply", "ServerSettings", "Transport", "arrays_nbytes", "check_update",
           "run_server"]
