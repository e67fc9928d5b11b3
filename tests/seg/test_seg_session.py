"""The interactive loop with a segmentation method: train in a project, watch live maps, pseudo-labels
as a label set, suggestions, corrections as paint for the next round."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from napari_wsimil.train.events import MapEvent

CONFIG = dict(width=8, depth=3, patches_per_epoch=32, batch_size=8, map_tile=128, val_patches=4, read_workers=2)


def test_segmentation_in_the_interactive_session(tmp_path: Path) -> None:
    from napari_wsimil.project import Project
    from napari_wsimil.seg.pseudo import label_set_path
    from napari_wsimil.slide.synthetic import synthesize_cohort
    from napari_wsimil.workflow.session import InteractiveSession, method_names, method_options

    assert {"pinchaud", "hybrid", "confkd"} <= set(method_names())  # the widget lists them from the registry
    assert any(name == "beta1" for name, *_ in method_options("pinchaud"))
    cohort = synthesize_cohort(tmp_path / "c", 4, seed=8, size=2048, workers=2)
    with Project.create_from_csv(tmp_path / "proj", cohort) as proj:
        session = InteractiveSession(proj)
        train_ids = [r.slide_id for r in proj.slides]
        spec = session.spec("pinchaud", "seg1", epochs=2, device="cpu", mpp=4.0, patch=32, config=dict(CONFIG))
        spec.val_fraction = 0.0
        events = list(session.train(spec, watch=[train_ids[0]]))
        maps = [e for e in events if isinstance(e, MapEvent)]
        assert maps and maps[-1].kind == "probability" and maps[-1].heatmap.shape == (256, 256)
        assert 0.0 <= float(maps[-1].heatmap.min()) and float(maps[-1].heatmap.max()) <= 1.0
        run = session.runs()[0]
        assert run.method == "pinchaud" and run.finished
        sid = train_ids[0]
        tumour, normal = session.class_ids()
        pseudo = session.pseudo_labels("seg1", sid, high=0.5, low=0.5)
        assert pseudo.shape == proj.label_geometry(sid).shape
        assert set(np.unique(pseudo)) <= {0, tumour, normal} and (pseudo > 0).any()
        assert label_set_path(proj.root, "seg1", sid).is_dir()
        sugg = session.suggestions("seg1", sid, k=3)
        assert sugg.shape[1] == 3 and 1 <= len(sugg) <= 3
        edited = pseudo.copy()
        edited[:8, :8] = tumour if pseudo[0, 0] != tumour else normal
        assert session.save_corrections(sid, pseudo, edited) == 64
        assert (proj.pixel_labels(sid)[:8, :8] == edited[:8, :8]).all()  # strong labels for the next round


def test_hybrid_rounds_write_pseudo_label_sets_into_the_project(tmp_path: Path) -> None:
    import tifffile

    from napari_wsimil.project import Project
    from napari_wsimil.seg.pseudo import label_set_path
    from napari_wsimil.slide.synthetic import synthesize_cohort
    from napari_wsimil.workflow.session import InteractiveSession

    cohort = synthesize_cohort(tmp_path / "c", 4, seed=8, size=2048, workers=2)
    with Project.create_from_csv(tmp_path / "proj", cohort) as proj:
        session = InteractiveSession(proj)
        tumour, normal = session.class_ids()
        rec = next(r for r in proj.slides if r.label == "malignant")
        gt = tifffile.imread(proj.resolve(rec.gt_mask))
        labels = proj.pixel_labels(rec.slide_id)
        from skimage.transform import resize

        gt_l = resize(gt > 0, labels.shape, order=0, preserve_range=True, anti_aliasing=False).astype(bool)
        labels[:] = np.where(gt_l, tumour, normal)
        proj.save_pixel_labels(rec.slide_id, labels)  # the pathologist painted one malignant slide
        for r in proj.slides:
            proj.set_split(r.slide_id, "train")
        spec = session.spec("hybrid", "hyb", epochs=2, device="cpu", mpp=4.0, patch=32,
                            config={**CONFIG, "epochs_per_round": 1})
        spec.val_fraction = 0.0
        list(session.train(spec))
        malignant = [r.slide_id for r in proj.slides if r.label == "malignant"]
        for sid in malignant:  # round 2's E-step wrote every malignant slide's pseudo-labels
            assert label_set_path(proj.root, "hyb", sid).is_dir()
