"""Train CLAM-SB on a small cohort and look at its attention: the interactive session the Training widget uses.

    python examples/03_train_clam_attention.py [--show]
"""

from _workdir import parse

from napari_wsimil.project import Project
from napari_wsimil.slide.synthetic import synthesize_cohort
from napari_wsimil.train.events import MapEvent
from napari_wsimil.workflow.session import InteractiveSession

args = parse(__doc__)
csv_path = synthesize_cohort(args.workdir / "cohort", 6, seed=3, size=2048)
with Project.create_from_csv(args.workdir / "project", csv_path) as project:
    session = InteractiveSession(project)
    sid = project.slide_ids[0]
    spec = session.spec("clam-sb", "clam", epochs=3, device="cpu", mpp=1.0, patch=128,
                        config={"hidden": 32, "attn_hidden": 16})
    last = None
    for ev in session.train(spec, watch=[sid]):
        if isinstance(ev, MapEvent):
            last = ev
        elif ev.kind == "epoch":
            print(f"epoch {ev.epoch}: loss {ev.losses['total']:.3f}")
    print(f"attention map of {sid}: {last.heatmap.shape}, slide probabilities {last.probs.round(3)}")
    print(f"where to label next: {session.suggestions('clam', sid, k=3)[:, :2].tolist()}")
    if args.show:
        import napari

        from napari_wsimil import open_slide
        from napari_wsimil.layers import attention_layer_data, slide_layer_data

        viewer = napari.Viewer()
        with open_slide(project.slide_path(sid)) as slide:
            for data, kw, kind in (slide_layer_data(slide),
                                   attention_layer_data(slide, last.heatmap, last.downsample, f"attention {sid}")):
                getattr(viewer, f"add_{kind}")(data, **kw)
            napari.run()
