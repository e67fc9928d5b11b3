"""A method family defined outside the package (tests/mean_pool_family.py) is registered at run time, then
trained, predicted, evaluated, mapped and corrected through the CLI, the interactive session and the
child-process runner, none of which knows it: they only call the family protocol."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("torch")

import mean_pool_family as mp  # noqa: E402  (tests/ is on sys.path: its conftest)


@pytest.fixture
def registered():
    from napari_wsimil.train.registry import register, unregister

    register(mp.METHOD)
    yield mp.METHOD
    unregister(mp.NAME)


@pytest.fixture(scope="module")
def cohort_csv(tmp_path_factory: pytest.TempPathFactory):
    from napari_wsimil.slide.synthetic import synthesize_cohort

    return synthesize_cohort(tmp_path_factory.mktemp("family"), 6, seed=3, size=2048)


def test_registry_lists_a_registered_family_and_forgets_it(registered) -> None:
    from napari_wsimil.train.engine import TrainingError
    from napari_wsimil.train.registry import added, family_of, methods, register, unregister
    from napari_wsimil.workflow.session import method_geometry, method_names, method_options, method_uses_encoder

    assert mp.NAME in methods() and mp.NAME in method_names() and added() == [mp.METHOD]
    assert family_of(mp.NAME) is mp.FAMILY and method_geometry(mp.NAME) == (2.0, 64)
    assert not method_uses_encoder(mp.NAME) and method_uses_encoder("clam-sb")
    assert [o[0] for o in method_options(mp.NAME)] == ["lr", "weight_decay", "optimizer", "early_stopping",
                                                        "patience", "min_epochs", "lr_plateau_factor",
                                                        "lr_plateau_patience", "temperature"]
    with pytest.raises(TrainingError, match="registered already"):
        register(mp.METHOD)
    unregister(mp.NAME)
    assert mp.NAME not in methods() and added() == []
    with pytest.raises(TrainingError, match="unknown method 'mean-pool'"):
        family_of(mp.NAME)
    register(mp.METHOD)  # for the fixture's own unregister


def test_cli_trains_predicts_and_evaluates_a_new_family(registered, cohort_csv, tmp_path, capsys) -> None:
    from napari_wsimil.cli import main
    from napari_wsimil.infer.predictions import read_predictions

    run, pred = tmp_path / "run", tmp_path / "pred"
    assert main(["train", str(cohort_csv), "--method", mp.NAME, "--out", str(run), "--epochs", "3",
                 "--set", "temperature=2"]) == 0
    info = json.loads((run / "run.json").read_text())
    state = json.loads((run / "last.json").read_text())
    assert info["family"] == mp.FAMILY.name and info["mpp"] == 2.0 and info["patch"] == 64  # the family's
    assert state["epoch"] == 3 and state["config"]["temperature"] == 2.0
    assert "done after epoch 3" in capsys.readouterr().out

    assert main(["predict", str(run), "--cohort", str(cohort_csv), "--out", str(pred)]) == 0
    ids, probs = read_predictions(pred / "predictions.csv")
    assert len(ids) == 6 and probs.shape == (6, 2) and np.allclose(probs.sum(1), 1)
    assert main(["evaluate", str(pred), "--cohort", str(cohort_csv)]) == 0
    metrics = json.loads((pred / "metrics.json").read_text())
    assert metrics["n_slides"] == 6 and "auc" in metrics

    assert main(["methods"]) == 0
    listed = capsys.readouterr().out
    assert mp.NAME in listed and mp.FAMILY.name in listed and "segmentation" in listed
    assert main(["train", str(cohort_csv), "--method", "no-such", "--out", str(tmp_path / "x")]) == 2
    assert "unknown method 'no-such'" in capsys.readouterr().err


def test_session_and_child_process_train_map_and_correct_a_new_family(registered, cohort_csv, tmp_path) -> None:
    from napari_wsimil.project import Project
    from napari_wsimil.train.events import MapEvent
    from napari_wsimil.workflow.session import InteractiveSession

    with Project.create_from_csv(tmp_path / "proj", cohort_csv) as project:
        session = InteractiveSession(project)
        sid = project.slide_ids[0]
        mpp, patch = 2.0, 64
        spec = session.spec(mp.NAME, "mp", epochs=2, device="cpu", mpp=mpp, patch=patch)
        events = list(session.train(spec, watch=[sid]))
        maps = [e for e in events if isinstance(e, MapEvent)]
        assert [m.epoch for m in maps] == [1, 2, 2] and all(m.slide_id == sid for m in maps)
        assert maps[-1].heatmap.ndim == 2 and 0 <= maps[-1].heatmap.min() <= maps[-1].heatmap.max() <= 1
        assert session.runs()[0].name == "mp" and session.runs()[0].finished

        shown = session.slide_map("mp", sid)  # a finished run's live layer
        assert isinstance(shown, MapEvent) and shown.heatmap.shape == maps[-1].heatmap.shape
        assert session.operating_threshold("mp") is None
        assert len(session.suggestions("mp", sid, k=3)) >= 1

        pseudo = session.pseudo_labels("mp", sid, high=0.6, low=0.4)
        assert pseudo.shape == tuple(project.label_geometry(sid).shape)
        _tumour, normal = session.class_ids()
        edited = pseudo.copy()
        edited[:8, :8] = np.where(pseudo[:8, :8] == normal, 0, normal)
        assert session.save_corrections(sid, pseudo, edited) > 0

        # corrections feed the next round the family's way (default: the run continues), and the child
        # process the widget uses gets the method registered here, at run time
        again = session.retrain_spec("mp", extra_epochs=1, device="cpu")
        assert again.resume and again.method == mp.NAME and again.epochs == 3
        child = list(session.train_process(again, watch=[sid]))
        assert [e.epoch for e in child if getattr(e, "kind", "") == "done"] == [3]
        assert any(isinstance(e, MapEvent) for e in child)


def test_a_family_missing_part_of_the_protocol_cannot_be_made() -> None:
    """The protocol's required steps are abstract: a family that forgets one fails when it is created (before
    registration), not in the middle of a user's run."""
    from napari_wsimil.train.family import MethodFamily

    class Half(MethodFamily):
        name = "half"

        def prepare(self, spec, report=None):  # the other required steps are missing
            raise AssertionError("never called")

    with pytest.raises(TypeError, match="abstract"):
        Half()
    with pytest.raises(TypeError):
        MethodFamily()
