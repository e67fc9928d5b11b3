"""The self-supervised default encoder: it learns, it is cached per project, and it loads by name."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("torch")

from napari_wsimil.features import build_encoder, extract_cohort  # noqa: E402
from napari_wsimil.features.ssl import project_ssl_encoder, train_ssl_encoder  # noqa: E402
from napari_wsimil.slide.synthetic import synthesize_slide  # noqa: E402


def test_autoencoder_loss_decreases() -> None:
    rng = np.random.default_rng(0)
    # smooth colour blobs: learnable structure, unlike white noise
    base = rng.integers(0, 256, (48, 4, 4, 3)).astype(np.uint8)
    patches = np.repeat(np.repeat(base, 8, axis=1), 8, axis=2)
    enc, losses = train_ssl_encoder(patches, epochs=4, batch_size=16, width=8, device="cpu")
    assert losses[-1] < losses[0]
    assert enc.encode(patches[:3]).shape == (3, 32)


def test_project_cache_and_registry(tmp_path) -> None:
    from napari_wsimil.project import Project

    slide = tmp_path / "s.tif"
    synthesize_slide(slide, 1024, seed=2, malignant=True)
    p = Project.create(tmp_path / "proj")
    p.add_slide(slide, slide_id="s", label="malignant")
    settings = dict(patch_size=32, mpp=2.0, n_patches=32, epochs=1, device="cpu")
    enc = project_ssl_encoder(p, **settings)
    (path,) = (p.features_dir / "ssl").glob("ssl-ae-*.safetensors")
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["version"] == enc.version and meta["slides"] == ["s"] and meta["epochs"] == 1
    again = project_ssl_encoder(p, **settings, progress=_must_not_train)  # same data and settings: loaded
    assert again.version == enc.version
    other = project_ssl_encoder(p, **{**settings, "epochs": 2})  # other settings: another encoder beside it
    assert other.version != enc.version and len(list((p.features_dir / "ssl").glob("ssl-ae-*.safetensors"))) == 2
    by_name = build_encoder("ssl-ae", weights=path, device="cpu")
    x = np.random.default_rng(1).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    np.testing.assert_allclose(by_name.encode(x), enc.encode(x), rtol=1e-5, atol=1e-6)
    res = extract_cohort(p, None, by_name, patch_size=64, mpp=2.0)
    assert res[0].status == "done" and res[0].bag_path.parent.name == "ssl-ae"
    p.close()


def _must_not_train(epoch: int, epochs: int, loss: float) -> None:
    raise AssertionError("a cached encoder was trained again")

