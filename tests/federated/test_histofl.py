"""HistoFL in one process: its aggregation, the update checks, the round loop's run folder (that
``wsimil predict`` reads), resume, a rejected bad update, and DP-SGD's spent ε."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from napari_wsimil.cli import main
from napari_wsimil.errors import WsimilError
from napari_wsimil.federated.histofl import HistoFL, HistoFLConfig, noisy_average, site_weights
from napari_wsimil.federated.methods import METHODS, load_method
from napari_wsimil.federated.protocol import SiteTrainer, SiteUpdate
from napari_wsimil.federated.rounds import LocalTransport, ServerSettings, check_update, run_server


def _config(**kw) -> HistoFLConfig:
    base = dict(classes=["0", "1"], mil={"hidden": 16, "attn_hidden": 8}, lr=1e-3, rounds=2)
    return HistoFLConfig(**{**base, **kw})


def test_noisy_average_is_the_weighted_mean_plus_alpha_std_noise_on_weights_only():
    rng = np.random.default_rng(0)
    a = {"fc.weight": rng.normal(0, 2.0, (200, 300)), "fc.bias": rng.normal(size=200)}
    b = {"fc.weight": rng.normal(0, 1.0, (200, 300)), "fc.bias": rng.normal(size=200)}
    plain = noisy_average([a, b], [3, 1], 0.0, np.random.default_rng(1))
    np.testing.assert_allclose(plain["fc.weight"], 0.75 * a["fc.weight"] + 0.25 * b["fc.weight"])
    noisy = noisy_average([a, b], [3, 1], 0.1, np.random.default_rng(1))
    np.testing.assert_allclose(noisy["fc.bias"], plain["fc.bias"])  # biases: no noise
    noise = noisy["fc.weight"] - plain["fc.weight"]
    expected = np.sqrt((0.1 * a["fc.weight"].std()) ** 2 + (0.1 * b["fc.weight"].std()) ** 2)
    assert abs(noise.std() / expected - 1) < 0.02


def test_site_weights_uniform_or_by_slides():
    ups = [SiteUpdate({}, 1), SiteUpdate({}, 3)]
    np.testing.assert_allclose(site_weights(ups, "uniform"), [0.5, 0.5])
    np.testing.assert_allclose(site_weights(ups, "slides"), [0.25, 0.75])


def test_check_update_names_what_is_wrong():
    ref = {"w": np.zeros((2, 3), np.float32), "b": np.zeros(2, np.float32)}
    assert check_update(SiteUpdate({k: v + 1 for k, v in ref.items()}, 4, {"loss": 0.5}), ref) is None
    assert "shape" in check_update(SiteUpdate({"w": np.zeros((3, 2), np.float32), "b": ref["b"]}, 4), ref)
    assert "NaN" in check_update(SiteUpdate({"w": np.full((2, 3), np.nan, np.float32), "b": ref["b"]}, 4), ref)
    assert "missing" in check_update(SiteUpdate({"w": ref["w"]}, 4), ref)
    assert "example count" in check_update(SiteUpdate(dict(ref), 0), ref)
    assert "finite" in check_update(SiteUpdate(dict(ref), 2, {"loss": float("inf")}), ref)


def test_method_table_loads_lazily_and_names_problems():
    assert METHODS["fedmix"] == "napari_wsimil.federated.fedmix:FedMix"
    assert isinstance(load_method("histofl"), HistoFL)
    with pytest.raises(WsimilError, match="no federated method"):
        load_method("fedprox")


class _Poisoned(SiteTrainer):
    """A site that sends NaN weights (a broken or hostile site): the server must reject it and go on."""

    def __init__(self, inner: SiteTrainer):
        self.inner = inner

    def fit(self, global_arrays, server_round):
        upd = self.inner.fit(global_arrays, server_round)
        return SiteUpdate({k: np.full_like(v, np.nan) for k, v in upd.arrays.items()}, upd.num_examples,
                          upd.metrics)

    def evaluate(self, global_arrays):
        return self.inner.evaluate(global_arrays)


def test_rounds_write_a_predictable_run_reject_nan_and_resume(site_csvs, tmp_path):
    method, cfg = HistoFL(), _config(alpha=0.001)
    sites = {f"site{k}": method.site_trainer(p, cfg, tmp_path / f"work{k}") for k, p in enumerate(site_csvs)}
    sites["site2"] = _Poisoned(sites["site2"])
    run = tmp_path / "run"
    log: list[str] = []
    info = run_server(method, cfg, run, LocalTransport(sites), ServerSettings(rounds=2, min_sites=2), log.append)
    assert [r["round"] for r in info["rounds"]] == [1, 2]
    for row in info["rounds"]:
        assert set(row["sites"]) == {"site0", "site1"}
        assert "NaN" in row["rejected"]["site2"]
        assert row["bytes_sent"] > 0 and row["bytes_received"] > 0
        for m in row["sites"].values():
            assert m["num_examples"] >= 1 and "train_loss" in m and "global_val_bag" in m
    assert any("site2 is rejected" in line for line in log)
    saved = json.loads((run / "run.json").read_text())
    assert saved["family"] == "mil" and saved["federated"] == "histofl" and len(saved["rounds"]) == 2
    assert (run / "best.safetensors").is_file() and json.loads((run / "last.json").read_text())["epoch"] == 2

    # the server's run folder is an ordinary MIL run
    assert main(["predict", str(run), "--cohort", str(site_csvs[0]), "--out", str(tmp_path / "pred"),
                 "--no-heatmaps"]) == 0
    assert (tmp_path / "pred" / "predictions.csv").read_text().count("\n") == 5  # header + 4 slides

    with pytest.raises(WsimilError, match="--resume"):
        run_server(method, cfg, run, LocalTransport(sites), ServerSettings(rounds=3, min_sites=2))
    info = run_server(method, cfg, run, LocalTransport(sites), ServerSettings(rounds=3, min_sites=2, resume=True))
    assert [r["round"] for r in info["rounds"]] == [1, 2, 3]
    assert json.loads((run / "last.json").read_text())["epoch"] == 3


class _LateSite(LocalTransport):
    """Site b connects only after the server has asked who is there ``late`` times: a hospital whose node
    comes up a little after the others."""

    def __init__(self, sites, late: int):
        super().__init__(sites)
        self.asked, self.late = 0, late

    def sites(self):
        self.asked += 1
        return [s for s in super().sites() if s != "b" or self.asked > self.late]


def test_the_first_round_waits_for_start_sites_and_later_rounds_for_min_sites(site_csvs, tmp_path):
    method, cfg = HistoFL(), _config(rounds=2)
    trainers = {name: method.site_trainer(site_csvs[k], cfg, tmp_path / f"w{k}") for k, name in enumerate("ab")}
    # min-sites 1 alone: round 1 starts with the site that was there first, and b is never asked in it
    info = run_server(method, cfg, tmp_path / "early", _LateSite(trainers, late=1),
                      ServerSettings(rounds=1, min_sites=1))
    assert set(info["rounds"][0]["sites"]) == {"a"}
    # --start-sites 2: round 1 waits until b is there too
    log: list[str] = []
    info = run_server(method, cfg, tmp_path / "both", _LateSite(trainers, late=2),
                      ServerSettings(rounds=2, min_sites=1, start_sites=2), log.append)
    assert [set(r["sites"]) for r in info["rounds"]] == [{"a", "b"}, {"a", "b"}]
    assert "waiting for 2 site(s) (1 connected)" in log
    with pytest.raises(WsimilError, match="--start-sites"):  # it cannot ask for fewer than a round needs
        run_server(method, cfg, tmp_path / "bad", LocalTransport(trainers),
                   ServerSettings(rounds=1, min_sites=2, start_sites=1))
    with pytest.raises(WsimilError, match=r"1 site\(s\) connected after 0\.5 s, 2 needed \(--start-sites\)"):
        run_server(method, cfg, tmp_path / "alone", LocalTransport({"a": trainers["a"]}),
                   ServerSettings(rounds=1, min_sites=1, start_sites=2, wait_timeout=0.5))


def test_too_few_valid_updates_stop_the_run_and_keep_the_last_round(site_csvs, tmp_path):
    method, cfg = HistoFL(), _config()
    trainer = method.site_trainer(site_csvs[0], cfg, tmp_path / "w0")
    sites = {"a": _Poisoned(trainer), "b": _Poisoned(trainer)}
    with pytest.raises(WsimilError, match="fewer than 2 valid updates"):
        run_server(method, cfg, tmp_path / "run", LocalTransport(sites),
                   ServerSettings(rounds=1, min_sites=2, max_retries=1))
    assert not (tmp_path / "run" / "last.json").exists()


def test_dp_sgd_spends_at_most_its_budget_and_reports_it_each_round(site_csvs, tmp_path):
    method, cfg = HistoFL(), _config(dp_epsilon=4.0, dp_delta=1e-3, rounds=2)
    sites = {f"site{k}": method.site_trainer(p, cfg, tmp_path / f"w{k}") for k, p in enumerate(site_csvs[:2])}
    info = run_server(method, cfg, tmp_path / "run", LocalTransport(sites), ServerSettings(rounds=2, min_sites=2))
    for name in sites:
        eps = [row["sites"][name]["dp_epsilon"] for row in info["rounds"]]
        assert 0 < eps[0] < eps[1] <= 4.0 * 1.02  # get_noise_multiplier's tolerance is 0.01
        assert info["rounds"][0]["sites"][name]["dp_delta"] == 1e-3
    # the ledger survives the trainer: a site that rejoins keeps counting
    again = method.site_trainer(site_csvs[0], cfg, tmp_path / "w0")
    upd = again.fit(method.read_round(tmp_path / "run")[0], 3)
    assert upd.metrics["dp_epsilon"] > info["rounds"][1]["sites"]["site0"]["dp_epsilon"]


def test_a_site_keeps_its_adam_state_across_rounds_but_starts_each_from_the_global_weights(site_csvs, tmp_path):
    import json as _json

    from safetensors.numpy import load_file

    method, cfg = HistoFL(), _config()
    site = method.site_trainer(site_csvs[0], cfg, tmp_path / "w")
    g = method.initial_arrays(cfg)
    site.fit(g, 1)
    site.fit(g, 2)  # the same global weights again: only the optimiser remembers round 1
    state = _json.loads((tmp_path / "w" / "local" / "last.json").read_text())
    assert state["epoch"] == 2
    steps = load_file(str(tmp_path / "w" / "local" / state["tensors"]))["optim.0.step"]
    assert float(steps) == 2 * site.n_train  # one step per slide and epoch (balanced sampler), both rounds


def test_sites_on_plain_sgd_average_to_a_step_on_the_pooled_gradient(site_csvs, tmp_path):
    """site_optimizer='sgd': a site's round is plain SGD from the global weights (no Adam state), so averaging
    one step per site by slide count is one step on the pooled gradient; bad choices are named."""
    import torch
    from safetensors.numpy import load_file

    method, cfg = HistoFL(), _config(site_optimizer="sgd", lr=0.05, alpha=0.0)
    site = method.site_trainer(site_csvs[0], cfg, tmp_path / "w")
    g = method.initial_arrays(cfg)
    upd = site.fit(g, 1)
    state = json.loads((tmp_path / "w" / "local" / "last.json").read_text())
    assert state["config"]["optimizer"] == "sgd" and state["config"]["lr"] == 0.05
    assert not any(k.startswith("optim.") for k in load_file(str(tmp_path / "w" / "local" / state["tensors"])))
    assert any(not np.allclose(upd.arrays[k], g[k]) for k in g)
    # the linear algebra the option rests on: a slide-weighted mean of per-site SGD steps is the pooled step
    rng = np.random.default_rng(0)
    grads, n = [rng.normal(size=5) for _ in range(3)], np.array([7.0, 2.0, 4.0])
    w0 = torch.zeros(5)
    steps = []
    for gr in grads:
        p = torch.nn.Parameter(w0.clone())
        opt = torch.optim.SGD([p], lr=0.1)
        p.grad = torch.as_tensor(gr, dtype=torch.float32)
        opt.step()
        steps.append(p.detach().numpy())
    pooled = -0.1 * sum(k * gr for k, gr in zip(n, grads)) / n.sum()
    assert np.allclose(sum(k * s for k, s in zip(n, steps)) / n.sum(), pooled, atol=1e-6)
    with pytest.raises(WsimilError, match="site_optimizer must be 'adam' or 'sgd'"):
        _config(site_optimizer="adagrad")
    with pytest.raises(WsimilError, match="lr must be above 0"):
        _config(lr=0.0)


def test_arrays_keep_their_shapes_through_flower_records_and_checkpoints(tmp_path):
    """BatchNorm's num_batches_tracked is 0-d: np.ascontiguousarray would make it (1,), and every site's update
    would then be rejected by the shape check (FedMix's U-Net has BatchNorm)."""
    import numpy as np

    from napari_wsimil.federated.flower_apps import from_record, to_record

    arrays = {"bn.num_batches_tracked": np.array(7, dtype=np.int64), "w": np.ones((2, 3), np.float32).T}
    back = from_record(to_record(arrays))
    assert {k: v.shape for k, v in back.items()} == {"bn.num_batches_tracked": (), "w": (3, 2)}
    assert int(back["bn.num_batches_tracked"]) == 7 and np.array_equal(back["w"], arrays["w"])
