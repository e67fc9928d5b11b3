"""``wsimil federate``: server, site, keys and simulate (see :mod:`.deploy`)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..errors import WsimilError

HISTOFL_NOTE = ("HistoFL's own noise (alpha) blurs the weights but carries NO privacy guarantee; for one, set "
                "dp_epsilon (DP-SGD at every site with Opacus; the spent ε per site and round is in RUN/run.json).")


def _settings(values: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in values or []:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise WsimilError(f"--set takes OPTION=VALUE, got {item!r}")
        try:
            out[key.strip()] = json.loads(raw)
        except ValueError:
            out[key.strip()] = raw
    return out


def register(sub: Any) -> None:
    p = sub.add_parser("federate", help="train across sites whose slides never leave them (Flower)",
                       description="Federated training on Flower's deployment engine: a server (SuperLink) and one "
                                   "site (SuperNode) per hospital. Only weights and a few numbers travel. "
                                   + HISTOFL_NOTE)
    fed = p.add_subparsers(dest="federate_command", metavar="ACTION")

    s = fed.add_parser("server", help="run the federation's server", description=(
        "Start the server, wait for the sites and run the rounds. RUN becomes a training run folder (a checkpoint "
        "per round, run.json with per-round, per-site metrics, messages.jsonl with the shape of every message "
        "received) that 'wsimil predict' uses. " + HISTOFL_NOTE))
    s.add_argument("--method", default="histofl", help="histofl (attention MIL) or fedmix (segmentation)")
    s.add_argument("--rounds", type=int, default=10, metavar="N")
    s.add_argument("--min-sites", type=int, default=2, metavar="K",
                   help="rounds wait for K sites and aggregate when K valid updates came back (default 2)")
    s.add_argument("--start-sites", type=int, default=None, metavar="K",
                   help="wait for K sites before the first round, so it includes every site you expect; later "
                        "rounds go on with --min-sites (default: --min-sites)")
    s.add_argument("--out", required=True, metavar="RUN", help="the run folder")
    s.add_argument("--address", default="127.0.0.1:9092", metavar="HOST:PORT",
                   help="where sites connect (default 127.0.0.1:9092; 0.0.0.0:PORT for the network)")
    s.add_argument("--keys", metavar="DIR", help="TLS certificate and site keys from 'wsimil federate keys'; "
                                                 "required away from loopback")
    s.add_argument("--insecure", action="store_true",
                   help="no TLS, no site authentication, even on the network (anyone can join and read weights)")
    s.add_argument("--set", action="append", default=[], metavar="OPTION=VALUE",
                   help="a method setting, e.g. --set alpha=0.001 --set dp_epsilon=8 --set mil_method=clam-sb")
    s.add_argument("--dp-epsilon", type=float, metavar="E", help="DP-SGD budget ε per site (HistoFL)")
    s.add_argument("--dp-delta", type=float, metavar="D", help="DP-SGD δ (HistoFL; default 1e-4)")
    s.add_argument("--dp-clip", type=float, metavar="C", help="DP-SGD per-slide clipping norm (HistoFL; default 1)")
    s.add_argument("--round-timeout", type=float, default=600.0, metavar="S",
                   help="seconds a round waits for the sites' updates (default 600)")
    s.add_argument("--wait-timeout", type=float, default=600.0, metavar="S",
                   help="seconds to wait for --min-sites sites to connect (default 600)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--resume", action="store_true", help="continue RUN after its last completed round")
    s.set_defaults(func=_cmd_server)

    t = fed.add_parser("site", help="join a federation with this site's project or cohort CSV",
                       description="Run this site's Flower SuperNode: it trains on SOURCE when the server asks and "
                                   "sends back only weights and a few numbers.")
    t.add_argument("source", metavar="PROJECT_OR_CSV")
    t.add_argument("--server", required=True, metavar="HOST:PORT")
    t.add_argument("--name", help="the site's name in the server's run.json (default: the source's name)")
    t.add_argument("--workdir", metavar="DIR", help="where the site keeps features, privacy ledger and logs")
    t.add_argument("--root-cert", metavar="CA.pem", help="the federation's CA certificate")
    t.add_argument("--key", metavar="SITE.key", help="this site's private key")
    t.add_argument("--insecure", action="store_true", help="join without TLS (test setups only)")
    t.add_argument("--no-rejoin", action="store_true",
                   help="stop when the server goes away (default: join again, e.g. after a server --resume)")
    t.set_defaults(func=_cmd_site)

    k = fed.add_parser("keys", help="make a CA, a server certificate and site keys",
                       description="For a federation without its own PKI. DIR gets ca.pem (for every site), ca.key "
                                   "(keep offline), server.pem/server.key, sites/<name>.key (one per site, for that "
                                   "site only) and sites/<name>.pub (registered by the server).")
    k.add_argument("dir", metavar="DIR")
    k.add_argument("--sites", type=int, default=None, metavar="N", help="site keys named site1..siteN")
    k.add_argument("--names", default=None, help="site names, comma-separated (instead of --sites)")
    k.add_argument("--server-name", action="append", default=[], metavar="NAME",
                   help="a host name or IP the server is reached at (repeatable; localhost is always in)")
    k.set_defaults(func=_cmd_keys)

    m = fed.add_parser("simulate", help="server and sites on this workstation, as separate processes",
                       description="Split CSV by --site-column and run the server and one site per value as "
                                   "separate processes on loopback, with keys made on the fly. " + HISTOFL_NOTE)
    m.add_argument("csv", metavar="CSV")
    m.add_argument("--site-column", default="site")
    m.add_argument("--method", default="histofl")
    m.add_argument("--rounds", type=int, default=10, metavar="N")
    m.add_argument("--min-sites", type=int, default=None, metavar="K", help="default: every site")
    m.add_argument("--out", required=True, metavar="RUN")
    m.add_argument("--set", action="append", default=[], metavar="OPTION=VALUE")
    m.add_argument("--dp-epsilon", type=float, metavar="E")
    m.add_argument("--dp-delta", type=float, metavar="D")
    m.add_argument("--dp-clip", type=float, metavar="C")
    m.add_argument("--round-timeout", type=float, default=600.0, metavar="S")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--insecure", action="store_true", help="no TLS or site keys (faster to start)")
    m.add_argument("--resume", action="store_true")
    m.set_defaults(func=_cmd_simulate)
    p.set_defaults(func=_cmd_help(p))


def _cmd_help(parser: argparse.ArgumentParser) -> Any:
    def show(_args: argparse.Namespace) -> int:
        parser.print_help()
        return 2
    return show


def _with_dp(args: argparse.Namespace) -> dict[str, Any]:
    settings = _settings(args.set)
    for opt in ("dp_epsilon", "dp_delta", "dp_clip"):
        if getattr(args, opt, None) is not None:
            settings[opt] = getattr(args, opt)
    return settings


def _cmd_server(args: argparse.Namespace) -> int:
    from .deploy import serve

    serve(args.method, Path(args.out), args.rounds, args.min_sites, args.address, keys=args.keys,
          insecure=args.insecure, settings=_with_dp(args), resume=args.resume, round_timeout=args.round_timeout,
          wait_timeout=args.wait_timeout, seed=args.seed, start_sites=args.start_sites)
    return 0


def _cmd_site(args: argparse.Namespace) -> int:
    from .deploy import join

    return join(Path(args.source), args.server, name=args.name, workdir=args.workdir, root_cert=args.root_cert,
                key=args.key, insecure=args.insecure, rejoin=not args.no_rejoin)


def _cmd_keys(args: argparse.Namespace) -> int:
    from .keys import make_keys

    if args.names:
        names = [n.strip() for n in args.names.split(",") if n.strip()]
    elif args.sites:
        names = [f"site{i}" for i in range(1, args.sites + 1)]
    else:
        raise WsimilError("give --sites N or --names A,B,C")
    out = make_keys(args.dir, names, args.server_name)
    print(f"keys for {len(names)} site(s) in {out}: give each site ca.pem and its sites/<name>.key; keep ca.key "
          "offline")
    return 0


def _cmd_simulate(args: argparse.Namespace) -> int:
    from .deploy import simulate

    info = simulate(Path(args.csv), args.site_column, args.method, Path(args.out), args.rounds,
                    min_sites=args.min_sites, settings=_with_dp(args), resume=args.resume,
                    round_timeout=args.round_timeout, seed=args.seed, secure=not args.insecure)
    print(f"done: {len(info.get('rounds', []))} rounds in {args.out}")
    return 0


__all__ = ["register"]
