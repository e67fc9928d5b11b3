"""Pinchaud's weak segmentation from slide labels only, then tumour masks (OME-TIFF) and QuPath outlines.

    python examples/04_pinchaud_masks.py [--workdir DIR]
"""

from _workdir import parse

from napari_wsimil.cli import main
from napari_wsimil.slide.synthetic import synthesize_cohort

args = parse(__doc__)
csv_path = synthesize_cohort(args.workdir / "cohort", 6, seed=3, size=2048)
run, pred = args.workdir / "run", args.workdir / "pred"
small = ["--mpp", "4", "--patch", "32", "--set", "width=8", "--set", "depth=3", "--set", "patches_per_epoch=32",
         "--set", "batch_size=8", "--set", "map_tile=128", "--set", "val_patches=4"]
assert main(["train", str(csv_path), "--method", "pinchaud", "--out", str(run), "--epochs", "2", "--device", "cpu",
             *small]) == 0
assert main(["predict", str(run), "--cohort", str(csv_path), "--out", str(pred), "--masks", "--device", "cpu"]) == 0
print(sorted(p.name for p in (pred / "masks").iterdir()))
