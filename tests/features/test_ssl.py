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
    assert other.version != enc.version
    assert len(list((p.features_dir / "ssl").glob("ssl-ae-*.safetensors"))) == 2
    by_name = build_encoder("ssl-ae", weights=path, device="cpu")
    x = np.random.default_rng(1).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    np.testing.assert_allclose(by_name.encode(x), enc.encode(x), rtol=1e-5, atol=1e-6)
    res = extract_cohort(p, None, by_name, patch_size=64, mpp=2.0)
    assert res[0].status == "done" and res[0].bag_path.parent.name == "ssl-ae"
    p.close()


def _must_not_train(epoch: int, epochs: int, loss: float) -> None:
    raise AssertionError("a cached encoder was trained again")


# --- ssl-simclr --------------------------------------------------------------------------------------

def _blob_patches(n: int, size: int = 32, seed: int = 0) -> np.ndarray:
    """H&E-ish patches: pink background with a few purple discs (structure to contrast, no shared data)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    out = np.empty((n, size, size, 3), np.uint8)
    for i in range(n):
        img = np.array([235, 190, 215], np.float32) + rng.normal(0, 6, (size, size, 3))
        for _ in range(rng.integers(1, 6)):
            cy, cx, r = rng.uniform(0, size, 2).tolist() + [rng.uniform(2, 6)]
            img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = [90, 60, 150]
        out[i] = np.clip(img, 0, 255)
    return out


def _tiny_settings(**kw):
    from napari_wsimil.features.augment_he import HEAugment
    from napari_wsimil.features.simclr import SimCLRSettings

    return SimCLRSettings(**{"epochs": 2, "batch_size": 64, "width": 8, "augment": HEAugment(size=24), **kw})


def test_augmentations_keep_shape_dtype_range_and_zero_jitter_is_identity() -> None:
    import torch

    from napari_wsimil.features.augment_he import HEAugment, hed_to_rgb_t, rgb_to_hed_t, to_float_batch

    x = to_float_batch(_blob_patches(8, 40))
    g = torch.Generator().manual_seed(0)
    y = HEAugment(size=32, hed_scale=0.3, hed_shift=0.05, brightness=0.3, contrast=0.3, blur_p=1.0,
                  grey_p=0.5)(x, g)
    assert y.shape == (8, 3, 32, 32) and y.dtype == torch.float32
    assert float(y.min()) >= 0.0 and float(y.max()) <= 1.0 and not torch.equal(y[0], y[1])
    # zero-strength stain jitter is the identity, and so is the HED round trip it is made of
    assert HEAugment.stain(x, g, 0.0, 0.0) is x
    torch.testing.assert_close(HEAugment.stain(x, g, 1e-9, 0.0), x, atol=1e-5, rtol=0)
    torch.testing.assert_close(hed_to_rgb_t(rgb_to_hed_t(x)), x, atol=1e-5, rtol=0)
    # the geometry alone, without magnification jitter, is one of the 8 exact rotations/mirrors
    still = HEAugment(size=40, scale=(1.0, 1.0), hed_scale=0, hed_shift=0, brightness=0, contrast=0,
                      blur_p=0, grey_p=0)(x, g)
    d8 = [torch.rot90(t, k, (2, 3)) for t in (x, x.flip(3)) for k in range(4)]
    err = torch.stack([(still - t).abs().amax((1, 2, 3)) for t in d8], 1).amin(1)
    assert float(err.max()) < 1e-5


def test_nt_xent_prefers_matching_views() -> None:
    import torch

    from napari_wsimil.features.simclr import nt_xent

    z = torch.randn(32, 16, generator=torch.Generator().manual_seed(0))
    other = torch.randn(32, 16, generator=torch.Generator().manual_seed(1))
    assert float(nt_xent(z, z, 0.2)) < float(nt_xent(z, other, 0.2))


def test_simclr_deterministic_cached_and_shaped(tmp_path, one_torch_thread) -> None:
    import torch

    from napari_wsimil.features.simclr import simclr_encoder, train_simclr

    patches = _blob_patches(256)
    s = _tiny_settings()
    a, losses = train_simclr(patches, s, device="cpu")
    b, _ = train_simclr(patches, s, device="cpu")
    assert len(losses) == 2 and all(np.isfinite(losses))
    assert all(torch.equal(u, v) for u, v in zip(a.state_dict().values(), b.state_dict().values()))

    seen: list[tuple[int, int]] = []
    enc = simclr_encoder(patches, tmp_path, s, device="cpu", progress=lambda e, n, _l: seen.append((e, n)))
    assert seen == [(1, 2), (2, 2)]
    assert all(torch.equal(u, v) for u, v in zip(a.state_dict().values(), enc.module.state_dict().values()))
    f = enc.encode(patches[:5])
    assert f.shape == (5, 64) and f.dtype == np.float32 and enc.dim == 64 and enc.name == "ssl-simclr"
    (weights,) = tmp_path.glob("ssl-simclr-*.safetensors")
    assert json.loads(weights.with_suffix(".json").read_text())["version"] == enc.version
    again = simclr_encoder(patches, tmp_path, s, device="cpu", progress=_must_not_train)  # same: loaded
    assert again.version == enc.version
    np.testing.assert_array_equal(again.encode(patches[:5]), f)
    other = simclr_encoder(patches, tmp_path, _tiny_settings(temperature=0.5), device="cpu")  # retrains
    assert other.version != enc.version
    fewer = simclr_encoder(patches[:200], tmp_path, s, device="cpu")  # other data: retrains
    assert fewer.version not in (enc.version, other.version)
    assert len(list(tmp_path.glob("ssl-simclr-*.json"))) == 3
    by_name = build_encoder("ssl-simclr", weights=weights, device="cpu")
    np.testing.assert_allclose(by_name.encode(patches[:5]), f, rtol=1e-5, atol=1e-6)


def test_simclr_killed_run_leaves_no_weights_and_resumes(tmp_path, one_torch_thread) -> None:
    import torch

    from napari_wsimil.features.simclr import simclr_encoder, train_simclr

    patches = _blob_patches(192, seed=3)
    s = _tiny_settings(epochs=3)

    class Killed(Exception):
        pass

    def kill_after_first(epoch: int, epochs: int, loss: float) -> None:
        if epoch == 1:
            raise Killed

    with pytest.raises(Killed):
        simclr_encoder(patches, tmp_path, s, device="cpu", progress=kill_after_first)
    left = sorted(p.name for p in tmp_path.iterdir())
    assert len(left) == 1 and left[0].endswith(".ckpt.safetensors"), left  # a checkpoint, no weights
    resumed: list[int] = []
    enc = simclr_encoder(patches, tmp_path, s, device="cpu", progress=lambda e, n, _l: resumed.append(e))
    assert resumed == [2, 3]  # epoch 1 came from the checkpoint
    whole, _ = train_simclr(patches, s, device="cpu")
    pairs = zip(whole.state_dict().values(), enc.module.state_dict().values())
    assert all(torch.equal(u, v) for u, v in pairs)
    assert not list(tmp_path.glob("*.ckpt.safetensors"))  # removed once the weights are written


def test_project_simclr_encoder(tmp_path) -> None:
    from napari_wsimil.features.simclr import project_simclr_encoder
    from napari_wsimil.project import Project

    slide = tmp_path / "s.tif"
    synthesize_slide(slide, 1024, seed=2, malignant=True)
    p = Project.create(tmp_path / "proj")
    p.add_slide(slide, slide_id="s", label="malignant")
    enc = project_simclr_encoder(p, patch_size=32, mpp=2.0, n_patches=64, settings=_tiny_settings(epochs=1),
                                 device="cpu")
    (path,) = (p.features_dir / "ssl").glob("ssl-simclr-*.safetensors")
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["mpp"] == 2.0 and meta["slides"] == ["s"] and meta["version"] == enc.version
    by_name = build_encoder("ssl-simclr", weights=path, device="cpu")
    res = extract_cohort(p, None, by_name, patch_size=64, mpp=2.0)
    assert res[0].status == "done" and res[0].bag_path.parent.name == "ssl-simclr"
    p.close()


def test_features_command_trains_the_projects_own_encoder(tmp_path, capsys) -> None:
    """``wsimil features PROJECT --encoder ssl-simclr`` without --weights trains once, then reuses it
    (the name alone would otherwise give an untrained network)."""
    import argparse

    from napari_wsimil.features import read_bag
    from napari_wsimil.features.cli import register
    from napari_wsimil.project import Project

    def run(argv: list[str]) -> int:
        parser = argparse.ArgumentParser(prog="wsimil")
        register(parser.add_subparsers(dest="command"))
        args = parser.parse_args(argv)
        return args.func(args)

    slide = tmp_path / "s.tif"
    synthesize_slide(slide, 1024, seed=2, malignant=True)
    with Project.create(tmp_path / "proj") as p:
        p.add_slide(slide, slide_id="s", label="malignant")
    argv = ["features", str(tmp_path / "proj"), "--encoder", "ssl-simclr", "--mpp", "2", "--patch", "64",
            "--ssl-epochs", "1", "--ssl-patches", "48", "--device", "cpu"]
    assert run(argv) == 0
    err = capsys.readouterr().err
    assert "epoch 1/1" in err
    bag = read_bag(tmp_path / "proj" / "features" / "ssl-simclr" / "s.npz")
    assert bag.attrs["encoder"] == "ssl-simclr" and "random" not in bag.attrs["encoder_version"]
    assert run(argv) == 0  # the encoder is loaded, and the bag is current
    err = capsys.readouterr().err
    assert "epoch" not in err and "up to date" in err
    assert run(["features", str(slide), "--encoder", "ssl-simclr", "--out", str(tmp_path / "b")]) == 2
