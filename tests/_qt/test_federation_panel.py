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
    finally:
        panel.leave_btn.click()
    assert panel.proc.poll() is not None and "left" in panel.status.text()
    viewer.close()
