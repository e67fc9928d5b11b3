"""Open a slide lazily, find its tissue and lay a patch grid over it at a physical resolution.

    python examples/01_slide_tissue_patches.py [--show]

Uses CMU-1-Small-Region.svs from ../shared/data/slides beside the checkout when it is there, else the
plugin's synthetic sample slide.
"""

from pathlib import Path

from _workdir import parse

from napari_wsimil import open_slide
from napari_wsimil.slide.synthetic import sample_slide_path
from napari_wsimil.slide.tiling import PatchReader, patch_grid
from napari_wsimil.slide.tissue import tissue_mask

args = parse(__doc__)
real = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "slides" / "CMU-1-Small-Region.svs"
path = real if real.is_file() else sample_slide_path(args.workdir / "sample")
with open_slide(path) as slide:
    print(f"{path.name}: {slide.dimensions[0]} x {slide.dimensions[1]} px at {slide.mpp} µm/px, "
          f"{slide.level_count} levels")
    tissue = tissue_mask(slide)
    print(f"tissue: {tissue.mask.mean():.0%} of the slide (mask at {tissue.mpp:.1f} µm/px)")
    grid = patch_grid(slide, patch_size=224, mpp=1.0, min_tissue=0.5, tissue=tissue)
    print(f"{len(grid)} patches of 224 px at 1 µm/px on tissue")
    n = 0
    for coords, patches in PatchReader(slide, grid, batch_size=32):
        n += len(patches)
        assert patches.shape[1:] == (224, 224, 3)
    print(f"read {n} patches")
    if args.show:
        import napari

        from napari_wsimil.layers import patch_grid_layer_data, slide_layer_data

        viewer = napari.Viewer()
        for data, kw, kind in (slide_layer_data(slide), patch_grid_layer_data(slide, grid.coords, grid.size_level0)):
            getattr(viewer, f"add_{kind}")(data, **kw)
        napari.run()
