"""The Federation dock widget in a real viewer: it needs an open project and a server, starts this site as its own
process (Flower's SuperNode, here against a loopback address with no server yet), shows the site's rounds, and
leaving stops the process."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.gui
napari = pytest.importorskip("napari")
pytest.importorskip("flwr")


def test_join_needs_a_project_and_a_server_then_runs_the_site_and_shows_its_rounds(make_napari_viewer, qtbot,
                                                                                   tmp_path):
    from napari_wsimil._qt.federation_panel import FederationPanel
    from napari_wsimil.federated.launch import free_port

    viewer = make_napari_viewer(show=True)
    _, panel = viewer.window.add_plugin_dock_widget("napari-wsimil", "Federation")
    assert isinstance(panel, FederationPanel)
    assert not panel.join_btn.isEnabled() and "open a project" in panel.status.text()
    with pytest.raises(ValueError, match="open a project"):
        panel.command()

    panel.session.create_project(str(tmp_path / "proj"))  # what the Project widget's "New" does
    assert panel.join_btn.isEnabled()
    with pytest.raises(ValueError, match="server"):
        panel.command()
    panel.server.setText(f"127.0.0.1:{free_port()}")
    with pytest.raises(ValueError, match="CA certificate"):
        panel.command()
    panel.insecure.setChecked(True)
    cmd = panel.command()
    assert cmd[3:6] == ["federate", "site", str(panel.session.project.root)] and "--insecure" in cmd

    panel.join_btn.click()
    try:
        qtbot.waitUntil(lambda: (panel.workdir / "supernode.pid").exists(), timeout=30_000)
        assert panel.proc.poll() is None and panel.leave_btn.isEnabled() and "joined" in panel.status.text()
        # what the site's ClientApp appends after each message it answers
        with (panel.workdir / "rounds.jsonl").open("a") as f:
            f.write(json.dumps({"round": 1, "kind": "train", "train_loss": 0.6931, "global_val_auc": 0.5,
                                "dp_epsilon": 1.25}) + "\n")
        qtbot.waitUntil(lambda: panel.table.rowCount() == 1, timeout=5_000)
        assert [panel.table.item(0, j).text() for j in range(5)] == ["1", "train", "0.6931", "0.5", "1.25"]
        with (panel.workdir / "rounds.jsonl").open("a") as f:  # a FedMix site's names for the same columns
            f.write(json.dumps({"round": 2, "kind": "train", "loss": 0.25, "global_val_slide_auc": 0.75}) + "\n")
        qtbot.waitUntil(lambda: panel.table.rowCount() == 2, timeout=5_000)
        assert [panel.table.item(1, j).text() for j in range(5)] == ["2", "train", "0.25", "0.75", ""]
    finally:
        panel.leave_btn.click()
    assert panel.proc.poll() is not None and "left" in panel.status.text()
    viewer.close()


def _map_the_open_slide(make_napari_viewer, qtbot, project, run, kind: str):
    """A real viewer with the project open and the Federation panel pointed at ``run``: the map of the open
    slide is computed in a worker; the layer is the global model's ``kind`` of map, over the slide at the
    slide's µm scale and extent, and a screenshot of the map alone has content. Returns (viewer, panel,
    layer)."""
    import numpy as np

    viewer = make_napari_viewer(show=True)
    viewer.window._qt_window.resize(1000, 800)
    _, pw = viewer.window.add_plugin_dock_widget("napari-wsimil", "Labelling project")
    _, panel = viewer.window.add_plugin_dock_widget("napari-wsimil", "Federation")
    pw.open_project(project)
    s = panel.session
    sid, slide = s.slide_id, s.slide
    assert sid is not None and slide.mpp is not None
    name = f"global model {sid}"

    panel.global_path.setText(str(run))
    panel.map_btn.click()
    assert panel.tasks.busy  # the map is computed in a worker, not in the window's thread
    qtbot.waitUntil(lambda: name in viewer.layers and not panel.tasks.busy, timeout=60_000)
    layer = viewer.layers[name]
    meta = layer.metadata["wsimil"]
    assert (meta["round"], meta["map_kind"], meta["federated"]) == (1, kind, True)
    ds = meta["downsample"]
    assert layer.data.ndim == 2 and float(layer.data.max()) > 0
    assert np.allclose(layer.scale, (slide.mpp * ds, slide.mpp * ds))  # the slide's µm, not pixels
    assert np.allclose(layer.extent.world, s.image_layer.extent.world, atol=ds * slide.mpp * 1.01)
    for other in viewer.layers:  # on screen: the map alone
        other.visible = other is layer
    viewer.reset_view()
    shot = np.asarray(viewer.screenshot(canvas_only=True, flash=False))[..., :3].astype(int)
    # the map over the tissue (off tissue the map is 0, the colormap's black) covers part of the canvas
    assert (np.abs(shot - shot[0, 0]).sum(-1) > 30).mean() > 0.05
    return viewer, panel, layer


def test_the_global_models_map_of_the_open_slide(make_napari_viewer, qtbot, tmp_path):
    """A tiny in-process FedMix run; the panel pointed at its folder maps the slide open in the viewer in a
    worker thread: a layer over the slide at the slide's µm scale, with content on screen. Then the site's own
    copy of a newer global model (``PROJECT/federated/global``) is mapped by itself after the round."""
    from napari_wsimil.federated.fedmix import FedMix, run_local
    from napari_wsimil.federated.fedmix_config import FedMixConfig
    from napari_wsimil.federated.fedmix_sites import make_sites
    from napari_wsimil.federated.site_model import save_global_model
    from napari_wsimil.project import Project
    from napari_wsimil.slide.synthetic import synthesize_cohort

    cohort = synthesize_cohort(tmp_path / "cohort", 6, seed=5, size=1024, workers=1)
    cfg = FedMixConfig(mpp=4.0, patch=32, width=8, depth=2, batch_size=8, patches_per_round=16, val_patches=4,
                       read_workers=1, device="cpu", seed=3)
    run_local(make_sites(cohort, tmp_path / "sites"), cfg, 1, tmp_path / "run", evaluate=False)
    Project.create_from_csv(tmp_path / "proj", cohort).close()

    viewer, panel, layer = _map_the_open_slide(make_napari_viewer, qtbot, tmp_path / "proj", tmp_path / "run",
                                               "probability")

    # the site keeps the global model of each message it answers; ticked, the panel maps a new round by itself
    arrays, _, _ = FedMix.read_round(tmp_path / "run")
    save_global_model(FedMix(), cfg, arrays, 2, panel.workdir, ["0", "1"])
    panel.global_path.setText("")
    panel.auto_map.setChecked(True)
    qtbot.waitUntil(lambda: layer.metadata["wsimil"]["round"] == 2 and not panel.tasks.busy, timeout=60_000)
    assert layer.metadata["wsimil"]["run"] == str(panel.workdir / "global")
    viewer.close()


def test_the_histofl_global_models_attention_map_of_the_open_slide(make_napari_viewer, qtbot, tmp_path):
    """A tiny in-process HistoFL run (two sites, one round); the panel pointed at its folder maps the slide open
    in the viewer in a worker: the global model's attention, a layer over the slide at the slide's µm scale and
    extent, with content on screen."""
    import csv

    from napari_wsimil.federated.histofl import HistoFL, HistoFLConfig
    from napari_wsimil.federated.rounds import LocalTransport, ServerSettings, run_server
    from napari_wsimil.project import Project
    from napari_wsimil.slide.synthetic import synthesize_cohort

    cohort = synthesize_cohort(tmp_path / "cohort", 8, seed=0, size=1024, workers=1)
    rows = list(csv.DictReader(open(cohort)))
    site_csvs = []
    for k in range(2):  # two sites, slides dealt round-robin (paths stay relative to the cohort's folder)
        site_csvs.append(cohort.parent / f"site{k}.csv")
        with site_csvs[-1].open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows[k::2])
    method = HistoFL()
    cfg = HistoFLConfig(classes=["0", "1"], mil={"hidden": 16, "attn_hidden": 8}, lr=1e-3, rounds=1)
    sites = {f"site{k}": method.site_trainer(p, cfg, tmp_path / f"work{k}") for k, p in enumerate(site_csvs)}
    run_server(method, cfg, tmp_path / "run", LocalTransport(sites),
               ServerSettings(rounds=1, min_sites=2, evaluate_last=False))
    Project.create_from_csv(tmp_path / "proj", cohort).close()

    viewer, panel, _ = _map_the_open_slide(make_napari_viewer, qtbot, tmp_path / "proj", tmp_path / "run", "map")
    assert "attention" in panel.map_status.text()  # HistoFL's map is the global model's attention
    viewer.close()
