"""The Flower apps: a ServerApp running :func:`.rounds.run_server` over Flower's Grid, and a ClientApp running a
site's :class:`~.protocol.SiteTrainer` on the data its SuperNode was started with.

What travels: to a site, the global weights (an ArrayRecord) and the method's settings (a ConfigRecord: JSON of
numbers and names); back, the site's weights, a MetricRecord of numbers (``num-examples`` and the method's
metrics) and a ConfigRecord holding only the site's name. The server refuses any other record or key, and logs
the shape of every message it receives to ``RUN/messages.jsonl`` (record names, kinds, keys and sizes, no
values): what a privacy officer can read to see what left each site.

The site's data path, work folder and name are the SuperNode's ``--node-config``; they never reach the server.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid, ServerApp

from ..errors import WsimilError
from ..io.atomic import write_text
from .launch import SITE_HISTORY
from .methods import load_method
from .protocol import Arrays, SiteUpdate
from .rounds import Reply, ServerSettings, run_server
from .fedmix_validation import numbers_only
from .site_model import save_global_model

#: What a site's reply may hold: record name -> record type.
REPLY_RECORDS = {"arrays": ArrayRecord, "metrics": MetricRecord, "site": ConfigRecord}

server_app = ServerApp()
client_app = ClientApp()


def to_record(arrays: Arrays) -> ArrayRecord:
    return ArrayRecord({k: Array(np.array(v, order="C")) for k, v in arrays.items()})


def from_record(record: ArrayRecord) -> Arrays:
    return {k: a.numpy() for k, a in record.items()}


def make_config(method: Any, values: dict[str, Any]) -> Any:
    cls = method.config_cls
    return cls.from_dict(values) if hasattr(cls, "from_dict") else cls(**values)


# ------------------------------------------------------------------------------------------------ server
def describe_message(msg: Message) -> dict[str, Any]:
    """A received message's shape: each record's kind and keys (arrays: shape and dtype), never the values."""
    records: dict[str, Any] = {}
    for name, rec in msg.content.items():
        if isinstance(rec, ArrayRecord):
            records[name] = {"kind": "arrays", "keys": {k: [list(a.shape), a.dtype] for k, a in rec.items()}}
        elif isinstance(rec, MetricRecord):
            records[name] = {"kind": "metrics", "keys": sorted(rec)}
        elif isinstance(rec, ConfigRecord):
            records[name] = {"kind": "config", "keys": sorted(rec)}
        else:
            records[name] = {"kind": type(rec).__name__}
    return records


def node_left(msg: Message) -> bool:
    """Whether ``msg`` is the SuperLink's own answer for a site that stopped sending heartbeats (Flower's
    ``NODE_UNAVAILABLE`` error): the site is gone (crashed, killed, cut off), no reply will come from it."""
    return msg.has_error() and int(msg.error.code) == ErrorCode.NODE_UNAVAILABLE


def parse_reply(msg: Message) -> tuple[str, SiteUpdate | None, str | None]:
    """(site name, update, why it is refused) of a site's reply."""
    name = f"node-{msg.metadata.src_node_id}"
    if msg.has_error():
        return name, None, f"the site failed: {msg.error.reason}"
    content = msg.content
    site = content.get("site") if "site" in content else None
    if isinstance(site, ConfigRecord) and isinstance(site.get("name"), str):
        name = f"{site['name']}"
    extra = [k for k in content if k not in REPLY_RECORDS or not isinstance(content[k], REPLY_RECORDS[k])]
    if extra:
        return name, None, f"its message holds records the protocol does not allow: {extra}"
    if isinstance(site, ConfigRecord) and set(site) - {"name", "failed"}:
        return name, None, f"its site record holds more than its name: {sorted(site)}"
    if isinstance(site, ConfigRecord) and "failed" in site:
        return name, None, (f"the site could not train ({site['failed']}; the reason is in the site's own log, "
                            "as it may name its slides)")
    metrics = dict(content["metrics"]) if "metrics" in content else {}
    bad = [k for k, v in metrics.items() if not isinstance(v, (int, float))]
    if bad:
        return name, None, f"its metrics {bad} are not single numbers"
    n = metrics.pop("num-examples", 1)
    arrays = from_record(content["arrays"]) if "arrays" in content else {}
    return name, SiteUpdate(arrays, int(n) if float(n).is_integer() else -1, {k: float(v) for k, v in metrics.items()}), None


class FlowerTransport:
    """:class:`.rounds.Transport` over Flower's Grid; every received message's shape goes to ``audit``."""

    def __init__(self, grid: Grid, method: str, audit: Path | None):
        self.grid, self.method, self.audit = grid, method, audit
        self.names: dict[int, str] = {}  # node id -> the name its replies gave (for a node that left since)

    def sites(self) -> list[Any]:
        return list(self.grid.get_node_ids())

    def exchange(self, sites: Sequence[Any], kind: str, arrays: Arrays, config: dict[str, Any],
                 server_round: int, timeout: float) -> list[Reply]:
        content = RecordDict({"arrays": to_record(arrays),
                              "config": ConfigRecord({"method": self.method, "settings": json.dumps(config),
                                                      "round": int(server_round)})})
        msgs = [Message(content, dst_node_id=int(node), message_type=kind) for node in sites]
        replies = []
        for node, msg in _send_and_receive(self.grid, msgs, timeout):
            name, update, error = parse_reply(msg)
            left = node_left(msg)
            if left:
                name = self.names.get(node, f"node-{node}")
                error = "it left the federation: its heartbeats stopped (stopped, crashed or cut off)"
            elif not msg.has_error():
                self.names[node] = name
            nbytes = 0 if msg.has_error() else sum(len(a.data) for rec in msg.content.values()
                                                    if isinstance(rec, ArrayRecord) for a in rec.values())
            if self.audit is not None:
                with self.audit.open("a") as f:
                    f.write(json.dumps({"time": time.time(), "round": server_round, "kind": kind, "site": name,
                                        "node": node, "error": error,
                                        "records": {} if msg.has_error() else describe_message(msg)}) + "\n")
            replies.append(Reply(name, update, error, nbytes, left=left))
        return replies


#: Seconds between the server's checks for replies. Flower's ``Grid.send_and_receive`` waits 3 s between
#: checks, which a round pays on average 1.5 s for; a check is one small request to the SuperLink.
REPLY_POLL_S = 0.25


def _send_and_receive(grid: Grid, messages: list[Message], timeout: float) -> list[tuple[int, Message]]:
    """``Grid.send_and_receive`` with :data:`REPLY_POLL_S` between checks: push, then pull the replies until
    every message is answered or ``timeout`` seconds have passed; each reply with the node it was sent to (a
    reply the SuperLink makes itself names no site). A site that stops sending heartbeats is
    answered for by the SuperLink itself (a ``NODE_UNAVAILABLE`` error, :func:`node_left`), so the wait ends
    as soon as Flower knows it is gone, not at the timeout."""
    ids = list(grid.push_messages(messages))
    to_node = {mid: int(m.metadata.dst_node_id) for mid, m in zip(ids, messages)}
    pending = set(ids)
    end = time.monotonic() + timeout
    out: list[tuple[int, Message]] = []
    while pending:
        got = list(grid.pull_messages(pending))
        out.extend((to_node.get(m.metadata.reply_to_message_id, int(m.metadata.src_node_id)), m) for m in got)
        pending.difference_update(m.metadata.reply_to_message_id for m in got)
        if not pending or time.monotonic() >= end:
            break
        time.sleep(REPLY_POLL_S)
    return out


@server_app.main()
def server_main(grid: Grid, context: Context) -> None:
    cfg = context.run_config
    out = Path(str(cfg["out"]))
    method = load_method(str(cfg["method"]))
    config = make_config(method, json.loads(str(cfg["settings"])))
    settings = ServerSettings(rounds=int(cfg["rounds"]), min_sites=int(cfg["min-sites"]),
                              start_sites=int(cfg.get("start-sites", cfg["min-sites"])),
                              round_timeout=float(cfg["round-timeout"]), wait_timeout=float(cfg["wait-timeout"]),
                              resume=bool(cfg["resume"]), seed=int(cfg["seed"]))
    status = out / "server-status.json"
    try:
        run_server(method, config, out, FlowerTransport(grid, method.name, out / "messages.jsonl"), settings,
                   report=lambda m: print(f"[wsimil federate] {m}", flush=True))
    except WsimilError as exc:
        write_text(status, json.dumps({"ok": False, "error": str(exc)}))
        print(f"[wsimil federate] error: {exc}", flush=True)
        return
    write_text(status, json.dumps({"ok": True}))


# ------------------------------------------------------------------------------------------------ sites
def _site_reply(msg: Message, context: Context, kind: str) -> Message:
    node = context.node_config
    cfg = msg.content["config"]
    name = str(node.get("name", "site"))
    try:
        update = _site_work(msg, node, kind)
    except WsimilError as exc:
        # The reason stays in the site's log: it may name slides and labels, which never leave the site.
        print(f"[wsimil site {name}] {kind} round {int(cfg['round'])} failed: {exc}", flush=True)
        return Message(RecordDict({"site": ConfigRecord({"name": name, "failed": type(exc).__name__})}),
                       reply_to=msg)
    metrics = MetricRecord({**{k: float(v) for k, v in update.metrics.items()},
                            "num-examples": int(update.num_examples)})
    content = RecordDict({"metrics": metrics, "site": ConfigRecord({"name": name})})
    if update.arrays:
        content["arrays"] = to_record(update.arrays)
    shown = numbers_only(update.metrics)  # without FedMix's per-level counts (they go to the server only)
    print(f"[wsimil site {name}] {kind} round {int(cfg['round'])}: " + ", ".join(
        f"{k} {v:.4g}" for k, v in shown.items()), flush=True)
    # the site's own history (rounds, local loss, privacy spent), for its operator and the napari panel
    with open(Path(str(node["workdir"])) / SITE_HISTORY, "a") as f:
        f.write(json.dumps({"time": time.time(), "round": int(cfg["round"]), "kind": kind,
                            "num_examples": int(update.num_examples), **shown}) + "\n")
    return Message(content, reply_to=msg)


def _site_work(msg: Message, node: Any, kind: str) -> SiteUpdate:
    cfg = msg.content["config"]
    method = load_method(str(cfg["method"]))
    config = make_config(method, json.loads(str(cfg["settings"])))
    trainer = method.site_trainer(Path(str(node["source"])), config, Path(str(node["workdir"])))
    try:
        arrays = from_record(msg.content["arrays"])
        # kept at the site for its own look at the global model's maps (the Federation panel)
        save_global_model(method, config, arrays, int(cfg["round"]), Path(str(node["workdir"])),
                          getattr(trainer, "classes", None))
        if kind == "train":
            return trainer.fit(arrays, int(cfg["round"]))
        return SiteUpdate({}, 1, trainer.evaluate(arrays))
    finally:
        close = getattr(trainer, "close", None)
        if close is not None:
            close()


@client_app.train()
def site_train(msg: Message, context: Context) -> Message:
    return _site_reply(msg, context, "train")


@client_app.evaluate()
def site_evaluate(msg: Message, context: Context) -> Message:
    return _site_reply(msg, context, "evaluate")


__all__ = ["SITE_HISTORY", "FlowerTransport", "client_app", "describe_message", "node_left", "parse_reply",
           "server_app"]
