"""HistoFL across 3 sites against centralised training and each site alone, on the real-tissue benchmark.

The cohort is ``wsimil synth --textures`` with PatchCamelyon tiles (../shared/data/pcam): its train and val
slides are dealt to 3 sites, its test slides (held-out PCam tiles) are the test set of every model. Other labelled
tiles: ``--textures DIR --tile-mpp MPP`` (e.g. ../shared/data/crc_val_he_7k at 0.5 µm/px), with ``--tumour-share LO
HI`` for larger tumours (``wsimil synth --tumour-share``). Two splits:

* **even**: each site a third of the slides, stratified by label;
* **skewed**: site A holds 60 % of the slides, site C almost no tumour (one malignant slide at most).

``--sites K`` deals the same slides to K sites instead of 3 (skewed: A 1.8/K of them, the last site one malignant
slide, the others the rest evenly). Federation exists for hospitals that each have too few slides to train alone;
on the CRC cohorts 18-20 slides per site already reach test AUC 1.00 alone, so "HistoFL above every site alone"
could only tie there. More sites make each site data-poor while the centralised model, trained on the union of the
sites' slides, keeps exactly the same slides (and the stable model choice it had with 3 sites); the deal is the same
for a given seed and ``--sites 3`` is the deal of the runs made before the option.

Per split: HistoFL (the round loop of ``wsimil federate``, sites called in this process: the same code as over
Flower minus the transport), centralised ``wsimil train`` on all sites' slides with as many epochs as rounds,
and ``wsimil train`` on each site alone; every model then ``wsimil predict`` on the test slides, slide AUC from
those predictions. With ``--dp EPS ...`` HistoFL is also run with DP-SGD at each ε (the spent ε is read back
from run.json). ``--flower-rounds N`` times N rounds of the even split over real Flower processes
(``wsimil federate simulate``, TLS and site keys on): seconds and bytes per round.

python benchmarks/bench_federated.py [--quick] [--slides 36] [--size 3072] [--rounds 20] [--dp 8 2]
    [--flower-rounds 2] [--workdir DIR] [--seed 1] [--mil-method abmil|clam-sb] [--encoder ENC]
    [--textures DIR --tile-mpp MPP] [--tumour-share LO HI] [--sites 3] [--cohort-val]
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from _common import PCAM, PCAM_MPP, make_textured_cohort, table, wsimil  # noqa: E402

from napari_wsimil.project.cohort_csv import read_rows, write_rows  # noqa: E402

def _write(rows: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_rows(rows, path)


def site_names(k: int) -> tuple[str, ...]:
    """The sites' names: A, B, C, ... (``k`` of them)."""
    if not 3 <= k <= 26:  # the skewed split needs a large site, a site without tumour and one between
        raise ValueError(f"--sites must be 3 to 26, got {k}")
    return tuple(chr(ord("A") + i) for i in range(k))


def deal(rows: list[dict], how: str, seed: int, k: int = 3) -> dict[str, list[dict]]:
    """The train/val slides dealt to ``k`` sites (see the module doc); labels "0"/"1" (1: malignant).

    Every train/val slide goes to exactly one site, the same for a given seed. ``k`` = 3 gives the split of the
    runs made before ``--sites`` (A 60 % and C 15 % normals in the skewed one); for other ``k`` the skewed shares
    scale as 3/k: A 1.8/k of the slides, the last site one malignant slide and 0.45/k of the slides as normals,
    the sites between them the rest, dealt evenly."""
    names = site_names(k)
    rng = np.random.default_rng(seed)
    pool = [r for r in rows if r.get("split") != "test"]
    pos = [pool[i] for i in rng.permutation(len(pool)) if pool[i]["label"] == "1"]
    neg = [pool[i] for i in rng.permutation(len(pool)) if pool[i]["label"] != "1"]
    sites: dict[str, list[dict]] = {s: [] for s in names}
    if how == "even":
        for group in (pos, neg):
            for i, r in enumerate(group):
                sites[names[i % k]].append(r)
        return sites
    # skewed: the last site gets one malignant slide and a share of normals, A the largest share, the rest between
    last, middle = names[-1], names[1:-1]
    sites[last].append(pos.pop())
    n_total = len(pool)
    n_c_neg = max(2, round(0.45 / k * n_total))
    sites[last] += neg[:n_c_neg]
    neg = neg[n_c_neg:]
    rest = pos + neg
    rest = [rest[i] for i in rng.permutation(len(rest))]
    n_a = round(1.8 / k * n_total)
    sites["A"] += rest[:n_a]
    for i, r in enumerate(rest[n_a:]):
        sites[middle[i % len(middle)]].append(r)
    for s in ("A", *middle):  # every site needs both classes to train alone
        if len({r["label"] for r in sites[s]}) < 2:
            need = "1" if all(r["label"] != "1" for r in sites[s]) else "0"
            other = max((o for o in ("A", *middle) if o != s
                         and sum(r["label"] == need for r in sites[o]) > 1), key=lambda o: len(sites[o]))
            move = next(r for r in sites[other] if r["label"] == need)
            sites[other].remove(move)
            sites[s].append(move)
    return sites


def deal_val(rows: list[dict], k: int) -> dict[str, list[dict]]:
    """The cohort's val slides dealt round-robin within each class, so that every site gets some of each class
    it can (the skewed split skews only the training slides: a site's validation is for choosing its checkpoint)."""
    names = site_names(k)
    out: dict[str, list[dict]] = {s: [] for s in names}
    val = [r for r in rows if r.get("split") == "val"]
    for j, label in enumerate(sorted({r["label"] for r in val})):
        for i, r in enumerate(r for r in val if r["label"] == label):
            out[names[(i + j) % k]].append(r)  # each class starts one site on: the extras spread
    return out


def split_csvs(rows: list[dict], how: str, seed: int, k: int, out: Path,
               cohort_val: bool = False) -> tuple[dict[str, Path], Path]:
    """Each site's CSV and the pooled CSV (the union of the sites' slides: what centralised training gets).

    By default each site (and the pooled run) carves its own stratified validation slides from all the train
    and val slides it holds: the cohort's val slides could otherwise take a small site's only tumour slide out of
    its training set. With ``cohort_val`` the cohort's own split is kept: the training slides are dealt
    (``how``) and the val slides are dealt by :func:`deal_val`. Why: a textured cohort's val slides may be made
    of tiles no training slide shows (textures v3), and carving validation from the training slides would
    choose every checkpoint on tissue the model trained on."""
    if cohort_val:
        train = [r for r in rows if r.get("split") == "train"]
        dealt, val = deal(train, how, seed, k), deal_val(rows, k)
        if not all(val.values()):  # a site without one would carve its validation from its training slides
            raise ValueError(f"--cohort-val needs a validation slide at every site: the cohort has "
                             f"{sum(map(len, val.values()))} val slides for {k} sites "
                             "(more --slides, or fewer --sites)")
        sites = {s: dealt[s] + val[s] for s in dealt}
    else:
        sites = {s: [{**r, "split": ""} for r in v] for s, v in deal(rows, how, seed, k).items()}
    site_csvs = {s: _write(r, out / f"site_{s}.csv") for s, r in sites.items()}
    pooled = _write([r for s in sites for r in sites[s]], out / "pooled.csv")
    return site_csvs, pooled


def slide_auc(pred_dir: Path, test_rows: list[dict]) -> float:
    from napari_wsimil.infer.metrics import binary_auc

    probs = {r["slide_id"]: float(r["prob_1"]) for r in csv.DictReader((pred_dir / "predictions.csv").open())}
    ids = [r["slide_id"] for r in test_rows]
    return float(binary_auc(np.array([probs[i] for i in ids]), np.array([r["label"] == "1" for r in test_rows])))


def _train(csv_path: Path, out: Path, epochs: int, args: argparse.Namespace) -> Path:
    if not (out / "best.safetensors").is_file():
        wsimil("train", csv_path, "--method", args.mil_method, "--out", out, "--epochs", epochs, "--patch", args.patch,
               "--mpp", args.mpp, "--seed", args.seed, "--device", "cpu", "--encoder", args.encoder,
               "--set", "early_stopping=false")
    return out


def _auc_of(run: Path, test_csv: Path, test_rows: list[dict], pred: Path) -> float:
    wsimil("predict", run, "--cohort", test_csv, "--out", pred, "--device", "cpu", "--no-heatmaps")
    return slide_auc(pred, test_rows)


def _federate(site_csvs: dict[str, Path], run: Path, work: Path, args: argparse.Namespace, **extra) -> dict:
    from napari_wsimil.federated.histofl import HistoFL, HistoFLConfig
    from napari_wsimil.federated.rounds import LocalTransport, ServerSettings, run_server

    cfg = HistoFLConfig(classes=["0", "1"], mpp=args.mpp, patch=args.patch, rounds=args.rounds, seed=args.seed,
                        alpha=args.alpha, encoder=args.encoder, mil_method=args.mil_method, **extra)
    method = HistoFL()
    trainers = {}
    for name, path in site_csvs.items():
        wd = work / "sites" / run.parent.name / f"{run.name}_{name}"  # its own DP ledger per split and variant
        (wd / "features").parent.mkdir(parents=True, exist_ok=True)
        if not (wd / "features").exists():
            (wd / "features").symlink_to(work / "features", target_is_directory=True)  # one extraction for all
        trainers[name] = method.site_trainer(path, cfg, wd)
    if (run / "last.json").exists():
        return json.loads((run / "run.json").read_text())
    t = time.perf_counter()
    info = run_server(method, cfg, run, LocalTransport(trainers),
                      ServerSettings(rounds=args.rounds, min_sites=len(trainers), seed=args.seed))
    info["wall_s"] = time.perf_counter() - t
    return info


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="24 slides of 2048², 10 rounds")
    ap.add_argument("--slides", type=int, default=36)
    ap.add_argument("--size", type=int, default=3072)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--patch", type=int, default=256)
    ap.add_argument("--mpp", type=float, default=0.5)
    ap.add_argument("--alpha", type=float, default=0.001, help="HistoFL's noise level")
    ap.add_argument("--dp", type=float, nargs="*", default=[], metavar="EPS", help="also DP-SGD at these ε")
    ap.add_argument("--histofl-sgd", type=float, nargs="*", default=[], metavar="LR",
                    help="also HistoFL with its sites on plain SGD at these learning rates (site_optimizer=sgd)")
    ap.add_argument("--splits", nargs="+", default=["even", "skewed"], choices=["even", "skewed"])
    ap.add_argument("--flower-rounds", type=int, default=0, help="time this many rounds over real Flower")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--sites", type=int, default=3,
                    help="number of sites the train/val slides are dealt to (default 3); more sites, fewer slides each")
    ap.add_argument("--encoder", default="handcrafted", help="patch encoder of every model (as wsimil train's)")
    ap.add_argument("--mil-method", default="abmil", choices=["abmil", "clam-sb"],
                    help="the attention-MIL network of every model (HistoFL's sites, centralised, each site alone)")
    ap.add_argument("--textures", type=Path, default=PCAM)
    ap.add_argument("--tile-mpp", type=float, default=None,
                    help=f"µm/px of the textures' tiles (default {PCAM_MPP} for PCam; wsimil synth's own otherwise)")
    ap.add_argument("--tumour-share", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                    help="range of the malignant slides' tumour share of their tissue (wsimil synth --tumour-share; "
                         "default: the generator's)")
    ap.add_argument("--cohort-val", action="store_true",
                    help="keep the cohort's own val slides as every model's validation (dealt to the sites by class) "
                         "instead of carving validation from the training slides: with textures whose val slides "
                         "show their own tiles (PCam, textures v3), model choice then never sees training tissue")
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.quick:
        args.slides, args.size, args.rounds = 24, 2048, 10
    base = args.workdir or Path(tempfile.gettempdir()) / "wsimil-bench" / "federated"
    base.mkdir(parents=True, exist_ok=True)
    tile_mpp = args.tile_mpp or (PCAM_MPP if args.textures.resolve() == PCAM.resolve() else None)
    cohort = make_textured_cohort(base, args.slides, args.size, args.seed, args.textures, tile_mpp,
                                  tuple(args.tumour_share) if args.tumour_share else None)
    rows = read_rows(cohort)
    test_rows = [r for r in rows if r.get("split") == "test"]
    # the defaults keep the folder name of the runs made before these options
    tag = "" if args.mil_method == "abmil" else f"_{args.mil_method}"
    tag += "" if args.patch == 256 else f"_p{args.patch}"
    if args.textures.resolve() != PCAM.resolve():
        tag += f"_{args.textures.name}_{args.encoder}"
    elif args.encoder != "handcrafted":
        tag += f"_{args.encoder}"
    tag += "" if args.mpp == 0.5 else f"_m{args.mpp:g}"
    tag += "" if not args.tumour_share else f"_t{args.tumour_share[0]:g}-{args.tumour_share[1]:g}"
    tag += "" if args.sites == 3 else f"_k{args.sites}"
    tag += "_cv" if args.cohort_val else ""
    work = base / f"run_{args.slides}x{args.size}_s{args.seed}_r{args.rounds}{tag}"
    work.mkdir(parents=True, exist_ok=True)
    (work / "features").mkdir(exist_ok=True)
    test_csv = _write(test_rows, work / "test.csv")
    print(f"cohort: {len(rows)} slides of {args.size}² (real tissue: {args.textures.name}), {len(test_rows)} test; "
          f"{args.mil_method} on {args.encoder} features, {args.patch} px at {args.mpp} µm/px; {args.rounds} rounds = epochs",
          flush=True)
    results: dict = {}
    table_rows = []
    for how in args.splits:
        try:
            site_csvs, pooled = split_csvs(rows, how, args.seed, args.sites, work / how, args.cohort_val)
        except ValueError as exc:
            raise SystemExit(f"bench_federated: {exc}") from None
        sites = {n: read_rows(p) for n, p in site_csvs.items()}
        desc = ", ".join(f"{s}: {len(r)} ({sum(x['label'] == '1' for x in r)} tumour"
                         + (f", {sum(x['split'] == 'val' for x in r)} val)" if args.cohort_val else ")")
                         for s, r in sites.items())
        print(f"[{how}] sites {desc}", flush=True)
        res: dict = {"sites": {s: len(r) for s, r in sites.items()}}
        if not (work / how / "features").exists():  # wsimil train puts a CSV's bags beside the run: share them
            (work / how / "features").symlink_to(work / "features", target_is_directory=True)
        t = time.perf_counter()
        central = _train(pooled, work / how / "central", args.rounds, args)
        res["central"] = {"auc": _auc_of(central, test_csv, test_rows, work / how / "pred_central"),
                          "seconds": time.perf_counter() - t}
        for s in sites:
            t = time.perf_counter()
            alone = _train(site_csvs[s], work / how / f"alone_{s}", args.rounds, args)
            res[f"alone_{s}"] = {"auc": _auc_of(alone, test_csv, test_rows, work / how / f"pred_alone_{s}"),
                                 "seconds": time.perf_counter() - t}
        variants = [("histofl", {})] + [(f"histofl_dp{eps:g}", {"dp_epsilon": eps}) for eps in args.dp]
        variants += [(f"histofl_sgd{lr:g}", {"site_optimizer": "sgd", "lr": lr}) for lr in args.histofl_sgd]
        for tag, extra in variants:
            info = _federate(site_csvs, work / how / tag, work, args, **extra)
            per_round = [r["seconds"] for r in info["rounds"]]
            eps = max((m.get("dp_epsilon", 0.0) for r in info["rounds"][-1:] for m in r["sites"].values()),
                      default=0.0)
            res[tag] = {"auc": _auc_of(work / how / tag, test_csv, test_rows, work / how / f"pred_{tag}"),
                        "s_per_round": float(np.mean(per_round)),
                        "bytes_per_round": int(np.mean([r["bytes_sent"] + r["bytes_received"]
                                                        for r in info["rounds"]])),
                        "epsilon_spent": eps}
        for name, m in res.items():
            if isinstance(m, dict) and "auc" in m:
                table_rows.append([how, name, m["auc"], m.get("s_per_round", m.get("seconds", 0.0)),
                                   m.get("bytes_per_round", ""), m.get("epsilon_spent", "")])
        fed, cen = res["histofl"]["auc"], res["central"]["auc"]
        best_alone = max(res[f"alone_{s}"]["auc"] for s in sites)
        print(f"[{how}] HistoFL {fed:.3f} vs centralised {cen:.3f} (gap {cen - fed:+.3f}; goal <= 0.03), "
              f"best site alone {best_alone:.3f} (goal: HistoFL above every site alone: {fed > best_alone})",
              flush=True)
        for lr in args.histofl_sgd:
            sgd = res[f"histofl_sgd{lr:g}"]["auc"]
            print(f"[{how}] HistoFL, sites on SGD lr {lr:g}: {sgd:.3f} (gap to centralised {cen - sgd:+.3f}; "
                  f"above every site alone: {sgd > best_alone})", flush=True)
        results[how] = res
    print(table(table_rows, ["split", "model", "test slide AUC", "s (training; FL: per round)", "bytes/round", "ε spent"]))
    if args.flower_rounds:
        results["flower"] = flower_timing(work, args)
    (work / "federated.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                     "results": results}, indent=1))
    print(f"(details: {work / 'federated.json'})")
    return results


def flower_timing(work: Path, args: argparse.Namespace) -> dict:
    """Seconds and bytes per round of the even split over real Flower processes (TLS, site keys)."""
    rows = []
    for s in site_names(args.sites):
        for r in csv.DictReader((work / "even" / f"site_{s}.csv").open()):
            rows.append({**r, "site": s})
    cohort = _write(rows, work / "flower" / "cohort.csv")
    run = work / "flower" / f"run_{time.time_ns()}"
    t = time.perf_counter()
    wsimil("federate", "simulate", cohort, "--rounds", args.flower_rounds, "--out", run,
           "--set", f"mpp={args.mpp}", "--set", f"patch={args.patch}", "--set", 'classes=["0","1"]',
           "--set", f"encoder={args.encoder}", "--set", f"mil_method={args.mil_method}",
           "--round-timeout", 900)
    total = time.perf_counter() - t
    info = json.loads((run / "run.json").read_text())
    per_round = [r["seconds"] for r in info["rounds"]]
    out = {"rounds": len(per_round), "s_per_round": float(np.mean(per_round)), "total_s": total,
           "bytes_per_round": int(np.mean([r["bytes_sent"] + r["bytes_received"] for r in info["rounds"]]))}
    print(f"Flower (3 SuperNodes, TLS + site auth, loopback): {out['s_per_round']:.1f} s per round "
          f"(first round includes feature extraction), {out['bytes_per_round']} bytes per round, "
          f"{total:.0f} s in all", flush=True)
    return out


if __name__ == "__main__":
    main()
