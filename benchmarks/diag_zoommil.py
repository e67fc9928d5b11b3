"""Why does a ZoomMIL zoom miss the tumour? Diagnostics on the TRAINING and VALIDATION slides of a cohort (never
the test slides), and the validation slide AUC of a few training variants, to choose a default on.

For each variant (``NAME=OPT,OPT`` with ``--set`` options of ``wsimil train --method zoommil``) the model is
trained with the CLI on the cohort's training slides (validation for checkpoint choice), then, in this process,
on the zoom bags (same features as a prediction reads; hard top-K as in evaluation):

* **val slide AUC** (the only figure a variant is chosen on);
* **head AUCs**: per malignant slide, the Mann-Whitney AUC of a head's scores over ALL patches of a level
  (not only those on the zoom path) for "this patch holds tumour at the finest level" (a finest patch with
  tumour fraction >= 0.5 under it), averaged over slides; for the zoom heads (which decide where to zoom)
  and the level's attention heads (which pool the level into the bag vector, learned from the slide loss);
* **finest tumour rate**: the share of tumour among the finest patches the model reads, against the share
  among all finest patches under the lowest tissue grid (1.0x = the zoom is blind);
* **zoom-head gradients** (``--grads``, at the trained weights, training mode): the norm of the zoom and
  attention heads' gradients, the cosine between two noise draws' zoom-head gradients (near 0: the estimator
  returns noise), and the share of perturbed draws whose top-K differs from the hard top-K.

python benchmarks/diag_zoommil.py COHORT.csv --workdir DIR --seed 3 --epochs 30 \
    --variant base=levels=4,2,0.5,k=4 --variant ... [--grads]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import wsimil  # noqa: E402


def _auc(scores: np.ndarray, labels: np.ndarray) -> float:
    from napari_wsimil.infer.metrics import binary_auc

    labels = np.asarray(labels, bool)
    if labels.all() or not labels.any():
        return float("nan")
    return float(binary_auc(np.asarray(scores, np.float64), labels))


def level_truth(item, bag) -> list[np.ndarray]:
    """Per level, whether each patch holds tumour at the finest level (a finest descendant, or the patch itself
    at the finest level, with tumour fraction >= 0.5)."""
    from napari_wsimil.infer.evaluation import TruthItem, mask_downsample
    from napari_wsimil.infer.localisation import patch_tumour_fraction
    from napari_wsimil.project.mask_io import MaskImage

    n = bag.n_levels
    fine = bag.coords[-1]
    slide_mpp = float(bag.attrs.get("slide_mpp") or item.mpp or 0.5)
    size0 = bag.patch * bag.mpps[-1] / slide_mpp
    if item.gt_mask is None:
        flags = np.zeros(len(fine), bool)
    else:
        t = TruthItem(item.slide_id, Path(item.gt_mask), item.gt_downsample)
        with MaskImage(t.gt_mask) as mask:
            ds = mask_downsample(mask, t, str(item.path))
            flags = patch_tumour_fraction(fine, size0, mask.points, ds) >= 0.5
    out = [flags]
    for level in range(n - 2, -1, -1):
        r = bag.n_children(level)
        out.insert(0, out[0].reshape(-1, r).any(1))
    return out


def tensors(bag):
    import torch

    return [torch.from_numpy(np.asarray(f, np.float32)) for f in bag.features]


def head_scores(model, levels) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Zoom-head and attention-head logits over every patch of every level (eval mode)."""
    import torch

    zoom, att = [], []
    with torch.no_grad():
        for level, x in enumerate(levels):
            h = model.fc[level]((x - model.input_mean) / model.input_std)
            att.append(model.att[level](h)[0].reshape(-1).numpy())
            if level < len(model.zoom):
                zoom.append(model.zoom[level](h)[0].reshape(-1).numpy())
    return zoom, att


def evaluate(run_dir: Path, items: list, bags: dict, truths: dict) -> dict:
    import torch

    from napari_wsimil.zoommil.network import full_bag_fetch
    from napari_wsimil.zoommil.predict import load_zoom_run

    run = load_zoom_run(run_dir, device="cpu")
    model = run.model.eval()
    probs, labels = [], []
    z_auc = [[] for _ in model.zoom]
    a_auc = [[] for _ in model.att]
    read_rate, base_rate = [], []
    classes = run.classes
    for item in items:
        bag = bags[item.slide_id]
        levels = tensors(bag)
        with torch.no_grad():
            out = model(levels[0], full_bag_fetch(levels))
        p = torch.softmax(out.logits, 0).numpy()
        probs.append(1.0 - p[0])
        labels.append(classes.index(item.label) != 0)
        truth = truths[item.slide_id]
        if truth[-1].any():
            zs, ats = head_scores(model, levels)
            for level, s in enumerate(zs):
                z_auc[level].append(_auc(s, truth[level]))
            for level, s in enumerate(ats):
                a_auc[level].append(_auc(s, truth[level]))
            finest = out.rows[-1].numpy()
            read_rate.append(truth[-1][finest].mean())
            base_rate.append(truth[-1].mean())
    return {"val_auc" if items and items[0].split == "val" else "auc": _auc(np.array(probs), np.array(labels)),
            "zoom_head_auc": [float(np.nanmean(v)) if v else None for v in z_auc],
            "att_head_auc": [float(np.nanmean(v)) if v else None for v in a_auc],
            "finest_tumour_read": float(np.mean(read_rate)) if read_rate else None,
            "finest_tumour_all": float(np.mean(base_rate)) if base_rate else None}


def grad_stats(run_dir: Path, items: list, bags: dict, n: int = 8, seed: int = 0) -> dict:
    """At the trained weights, training mode (dropout on, perturbed top-K), on ``n`` training slides."""
    import torch
    import torch.nn.functional as F

    from napari_wsimil.zoommil.network import full_bag_fetch
    from napari_wsimil.zoommil.predict import load_zoom_run
    from napari_wsimil.zoommil.topk import _sorted_topk

    run = load_zoom_run(run_dir, device="cpu")
    model = run.model
    model.train()
    for p in model.parameters():  # a run loaded for prediction is frozen
        p.requires_grad_(True)
    classes = run.classes
    torch.manual_seed(seed)
    cos, zn, an, differ, rel_sigma = [], [], [], [], []
    cos1, zn1, an1 = [], [], []
    for item in items[:n]:
        levels = tensors(bags[item.slide_id])
        label = torch.tensor([classes.index(item.label)])
        grads, grads1 = [], []
        for _ in range(2):
            model.zero_grad()
            out = model(levels[0], full_bag_fetch(levels))
            F.cross_entropy(out.logits[None], label).backward()
            g = torch.cat([p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel())
                           for p in model.zoom[0].parameters()])
            grads.append(g.clone())
            g1 = torch.cat([p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel())
                            for p in model.zoom[1].parameters()])
            grads1.append(g1.clone())
            zn1.append(float(g1.norm()))
            an1.append(float(torch.cat([p.grad.reshape(-1) for p in model.att[1].parameters()
                                        if p.grad is not None] or [torch.zeros(1)]).norm()))
            zn.append(float(g.norm()))
            an.append(float(torch.cat([p.grad.reshape(-1) for p in model.att[0].parameters()
                                       if p.grad is not None] or [torch.zeros(1)]).norm()))
        if grads[0].norm() > 0 and grads[1].norm() > 0:
            cos.append(float(F.cosine_similarity(grads[0], grads[1], 0)))
        if grads1[0].norm() > 0 and grads1[1].norm() > 0:
            cos1.append(float(F.cosine_similarity(grads1[0], grads1[1], 0)))
        with torch.no_grad():
            h = model.fc[0]((levels[0] - model.input_mean) / model.input_std)
            z = torch.softmax(model.zoom[0](h)[0].reshape(-1), 0)
            k = min(model.k, len(z))
            if k < len(z):
                hard = _sorted_topk(z[None], k)
                noisy = _sorted_topk(z[None, None] + model.sigma * torch.randn(1, 100, len(z)), k)
                differ.append(float((noisy != hard[:, None]).any(-1).float().mean()))
                zs = torch.sort(z, descending=True).values
                rel_sigma.append(float((zs[k - 1] - zs[k]) / model.sigma))
    return {"zoom0_grad_norm": float(np.mean(zn)), "att0_grad_norm": float(np.mean(an)),
            "zoom0_grad_cos_two_draws": float(np.mean(cos)) if cos else None,
            "draws_changing_topk": float(np.mean(differ)) if differ else None,
            "kth_gap_over_sigma_median": float(np.median(rel_sigma)) if rel_sigma else None,
            "zoom1_grad_norm": float(np.mean(zn1)), "att1_grad_norm": float(np.mean(an1)),
            "zoom1_grad_cos_two_draws": float(np.mean(cos1)) if cos1 else None}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cohort", type=Path)
    ap.add_argument("--workdir", type=Path, required=True, help="runs go to DIR/diag_NAME, bags to DIR/features")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--levels", default="4,2,0.5")
    ap.add_argument("--patch", type=int, default=128)
    ap.add_argument("--encoder", default="handcrafted-v2")
    ap.add_argument("--variant", action="append", required=True, help="NAME=opt=v,opt=v (the --set options)")
    ap.add_argument("--grads", action="store_true")
    args = ap.parse_args(argv)

    from napari_wsimil.train.cohort import load_cohort
    from napari_wsimil.zoommil.bags import ensure_zoom_bags, read_zoom_bag
    from napari_wsimil.zoommil.family import zoom_dir

    cohort = load_cohort(args.cohort)
    mpps = [float(v) for v in args.levels.split(",")]
    train = [s for s in cohort.slides if s.split == "train"]
    val = [s for s in cohort.slides if s.split == "val"]
    t = time.perf_counter()
    out_dir = zoom_dir(cohort, args.workdir / "run_x", args.encoder, mpps, args.patch)
    paths = ensure_zoom_bags(train + val, out_dir, args.encoder, mpps, args.patch, device="cpu")
    bags = {sid: read_zoom_bag(p) for sid, p in paths.items()}
    truths = {s.slide_id: level_truth(s, bags[s.slide_id]) for s in train + val}
    print(f"(bags and truth of {len(bags)} train/val slides in {time.perf_counter() - t:.0f} s)", flush=True)
    results = {}
    for spec in args.variant:
        name, _, opts = spec.partition("=")
        options: list[str] = []
        for part in opts.split(","):  # "levels=4,2,0.5,k=4": a part without "=" continues the previous value
            if "=" in part or not options:
                options.append(part)
            else:
                options[-1] += "," + part
        options = [o for o in options if o]
        if not any(o.startswith("levels=") for o in options):
            options.append(f"levels={args.levels}")
        run = args.workdir / f"diag_{name}_{args.epochs}ep_s{args.seed}"
        t = time.perf_counter()
        if not (run / "best.safetensors").is_file():
            extra = [a for o in options for a in ("--set", o)]
            with contextlib.redirect_stdout(io.StringIO()):
                wsimil("train", args.cohort, "--method", "zoommil", "--out", run, "--epochs", args.epochs,
                       "--patch", args.patch, "--mpp", mpps[0], "--seed", args.seed, "--device", "cpu",
                       "--encoder", args.encoder, *extra)
        res = {"options": options, "train_s": round(time.perf_counter() - t, 1)}
        res["val"] = evaluate(run, val, bags, truths)
        res["train"] = evaluate(run, train, bags, truths)
        if args.grads:
            res["grads"] = grad_stats(run, train, bags)
        results[name] = res
        print(json.dumps({name: res}), flush=True)
    return results


if __name__ == "__main__":
    main()
