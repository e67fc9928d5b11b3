"""The global model at a site: kept as a run folder from what the server sent, and its map of one of the site's
own slides through the run family's own ``slide_map`` (HistoFL: attention, from the slide's feature bag)."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from napari_wsimil.errors import WsimilError
from napari_wsimil.federated.histofl import HistoFL, HistoFLConfig
from napari_wsimil.federated.rounds import LocalTransport, ServerSettings, run_server
from napari_wsimil.federated.site_model import GLOBAL_DIR, global_map, global_round, save_global_model


def test_a_histofl_global_model_maps_a_site_slide_as_attention(site_csvs, tmp_path):
    method = HistoFL()
    cfg = HistoFLConfig(classes=["0", "1"], mil={"hidden": 16, "attn_hidden": 8}, lr=1e-3, rounds=1)
    sites = {f"site{k}": method.site_trainer(p, cfg, tmp_path / f"work{k}") for k, p in enumerate(site_csvs[:2])}
    run = tmp_path / "run"
    run_server(method, cfg, run, LocalTransport(sites), ServerSettings(rounds=1, min_sites=2, evaluate_last=False))
    sid = next(csv.DictReader(site_csvs[0].open()))["slide_id"]

    with pytest.raises(WsimilError, match="no global model yet"):
        global_map(tmp_path / "work0" / GLOBAL_DIR, sid, site_csvs[0])
    arrays, rnd, _ = method.read_round(run)
    kept = save_global_model(method, cfg, arrays, rnd, tmp_path / "work0")  # what a site's ClientApp does
    assert kept == tmp_path / "work0" / GLOBAL_DIR and global_round(kept) == 1

    from_server = global_map(run, sid, site_csvs[0])
    at_site = global_map(kept, sid, site_csvs[0])
    assert (from_server.slide_id, from_server.kind, from_server.epoch) == (sid, "map", 1)
    assert from_server.heatmap.ndim == 2 and float(from_server.heatmap.max()) > 0
    np.testing.assert_allclose(at_site.heatmap, from_server.heatmap, atol=1e-6)  # the same model, the same map
