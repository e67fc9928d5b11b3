"""timm:ARCH encoders: timm's key layout and numerics without timm, weights files and hub folders,
`wsimil features` with them, one-line errors for the wrong weights."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from napari_wsimil.cli import main  # noqa: E402
from napari_wsimil.features import EncoderError, build_encoder, read_bag  # noqa: E402
from napari_wsimil.features.timm_encoders import native_architectures, timm_importable  # noqa: E402
from napari_wsimil.features.vit import build_vit  # noqa: E402
from napari_wsimil.slide import PatchReader, open_slide, patch_grid  # noqa: E402
from napari_wsimil.slide.synthetic import synthesize_slide  # noqa: E402

#: A small ViT (as a folder's model_args would say) so that every test runs in well under a second.
SMALL = dict(img_size=64, patch_size=16, depth=2, embed_dim=64, num_heads=4, init_values=1e-5,
             dynamic_img_size=True, num_classes=0)
MEAN, STD = (0.6, 0.5, 0.7), (0.2, 0.25, 0.15)  # not ImageNet's: the folder's must be the ones used


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread) -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def slide(tmp_path_factory: pytest.TempPathFactory):
    path = tmp_path_factory.mktemp("timm") / "one.tif"
    synthesize_slide(path, 1024, seed=3, malignant=True)
    return path


def _patches(slide_path, patch: int, mpp: float) -> tuple[np.ndarray, np.ndarray]:
    s = open_slide(slide_path)
    grid = patch_grid(s, patch, mpp)
    with PatchReader(s, grid, batch_size=len(grid), num_workers=0) as reader:
        _, patches = next(iter(reader))
    return grid.coords, patches


def _random_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Weights unlike any initialisation (layer scale and norms included), so loading them shows."""
    g = torch.Generator().manual_seed(7)
    out = {}
    for k, v in module.state_dict().items():
        if v.is_floating_point():
            if v.ndim >= 2:  # convolutions, projections, embeddings: keep their scale (no blow-up)
                v = v * (1 + 0.2 * torch.randn(v.shape, generator=g))
            else:  # norms, biases, layer scale, batch statistics
                v = v + 0.05 * torch.randn(v.shape, generator=g)
            if "running_var" in k:
                v = v.abs() + 0.5
        out[k] = v.contiguous()
    return out


def assert_features_equal(actual: np.ndarray, expected: np.ndarray) -> None:
    """allclose at 1e-5, relative to the features' scale (float32 sums over 50 layers)."""
    scale = max(float(np.abs(expected).max()), 1.0)
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5 * scale)


def _save(state: dict[str, torch.Tensor], path) -> None:
    if str(path).endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save(state, path)


def _folder(tmp_path, name: str, state, weights_name: str, model_args=SMALL, arch="vit_base_patch16_224"):
    d = tmp_path / name
    d.mkdir()
    (d / "config.json").write_text(json.dumps({
        "architecture": arch, "num_classes": 0, "num_features": model_args.get("embed_dim", 768),
        "global_pool": "token", "model_args": model_args,
        "pretrained_cfg": {"tag": "test", "input_size": [3, 64, 64], "interpolation": "bilinear",
                           "mean": list(MEAN), "std": list(STD), "num_classes": 0, "crop_pct": 1.0}}))
    _save(state, d / weights_name)
    return d


def _reference(module: torch.nn.Module, patches: np.ndarray, size: int | None, mean, std) -> np.ndarray:
    """The module on patches preprocessed here, independently of TorchEncoder.preprocess."""
    x = torch.from_numpy(patches).permute(0, 3, 1, 2).float() / 255.0
    if size is not None:
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True)
    x = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    with torch.inference_mode():
        return module.eval()(x).numpy()


def test_vit_large_has_timm_keys_and_shapes() -> None:
    """UNI's architecture, built on the meta device (no memory, no time): timm's 342 keys and shapes."""
    with torch.device("meta"):
        m = build_vit("vit_large_patch16_224", img_size=224, patch_size=16, init_values=1e-5,
                      dynamic_img_size=True)
    sd = m.state_dict()
    assert len(sd) == 342 and list(sd)[:4] == ["cls_token", "pos_embed", "patch_embed.proj.weight",
                                               "patch_embed.proj.bias"]
    assert tuple(sd["pos_embed"].shape) == (1, 197, 1024)
    assert tuple(sd["blocks.23.ls2.gamma"].shape) == (1024,)
    for k in ("blocks.0.norm1.weight", "blocks.0.attn.qkv.bias", "blocks.0.attn.proj.weight",
              "blocks.0.ls1.gamma", "blocks.0.mlp.fc1.weight", "blocks.0.mlp.fc2.bias", "norm.weight"):
        assert k in sd, k
    assert not any(k.startswith(("head", "fc_norm")) for k in sd)
    assert sum(v.numel() for v in sd.values()) == 303_350_784  # timm's vit_large_patch16_224, num_classes=0
    assert m.blocks[0].norm1.eps == 1e-6


def test_folder_safetensors_and_bin_give_the_modules_features(tmp_path, slide) -> None:
    ref = build_vit("vit_base_patch16_224", **SMALL)
    state = _random_state(ref)
    ref.load_state_dict(state)
    a = _folder(tmp_path, "hub_st", state, "model.safetensors")
    b = _folder(tmp_path, "hub_bin", state, "pytorch_model.bin")
    for folder, out in ((a, "bags_a"), (b, "bags_b")):
        rc = main(["features", str(slide), "--out", str(tmp_path / out), "--patch", "48", "--mpp", "2.0",
                   "--encoder", "timm", "--weights", str(folder), "--device", "cpu"])
        assert rc == 0
    bag_a, bag_b = read_bag(tmp_path / "bags_a" / "one.npz"), read_bag(tmp_path / "bags_b" / "one.npz")
    coords, patches = _patches(slide, 48, 2.0)
    np.testing.assert_array_equal(bag_a.coords, coords)
    expected = _reference(ref, patches, 64, MEAN, STD)  # 48 px patches resized to the config's 64
    np.testing.assert_allclose(bag_a.features, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(bag_b.features, bag_a.features, rtol=1e-5, atol=1e-5)
    assert bag_a.attrs["encoder"] == "timm:vit_base_patch16_224" and bag_a.features.shape[1] == 64
    assert bag_a.attrs["encoder_version"] != bag_b.attrs["encoder_version"]  # the files' hashes differ


def test_resnet50_files_via_cli(tmp_path, slide) -> None:
    """The full-size timm ResNet-50 trunk from a .safetensors and a torch file (with an fc head, as
    torchvision's files have: dropped), equal to the module on the same patches."""
    from napari_wsimil.features.resnet import resnet50

    full = resnet50()
    state = _random_state(full)
    full.load_state_dict(state)
    _save(state, tmp_path / "r50.safetensors")
    _save(state, tmp_path / "r50.pt")
    for name in ("r50.safetensors", "r50.pt"):
        rc = main(["features", str(slide), "--out", str(tmp_path / name.replace(".", "_")), "--patch", "64",
                   "--mpp", "4.0", "--encoder", "timm:resnet50", "--weights", str(tmp_path / name),
                   "--device", "cpu"])
        assert rc == 0
    st = read_bag(tmp_path / "r50_safetensors" / "one.npz")
    pt = read_bag(tmp_path / "r50_pt" / "one.npz")
    _, patches = _patches(slide, 64, 4.0)
    expected = _reference(full, patches, None, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert_features_equal(st.features, expected)
    assert_features_equal(pt.features, st.features)
    assert st.features.shape[1] == 2048


@pytest.mark.parametrize("wrap", ["module", "state_dict", "both"])
def test_wrapped_and_uni_like_bare_files(tmp_path, wrap: str) -> None:
    """A bare file under DataParallel's ``module.`` prefix or a ``{"state_dict": ...}`` wrapper; its
    layer-scale keys (as UNI's) are recognised without init_values being named."""
    args = {k: v for k, v in SMALL.items() if k != "init_values"}
    ref = build_vit("vit_large_patch16_224", **SMALL)
    state = _random_state(ref)
    ref.load_state_dict(state)
    saved: dict = {f"module.{k}": v for k, v in state.items()} if wrap in ("module", "both") else dict(state)
    if wrap in ("state_dict", "both"):
        saved = {"state_dict": saved, "epoch": 3}
    torch.save(saved, tmp_path / "w.pth")
    enc = build_encoder("timm:vit_large_patch16_224", weights=tmp_path / "w.pth", device="cpu",
                        model_args=args)
    patches = np.random.default_rng(1).integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    imagenet = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    expected = _reference(ref, patches, 64, *imagenet)
    np.testing.assert_allclose(enc.encode(patches), expected, rtol=1e-5, atol=1e-5)
    assert enc.input_size == 64 and enc.version.startswith("1+") and "random" not in enc.version


def test_wrong_shapes_one_line_exit_2(tmp_path, slide, capsys) -> None:
    """Weights of another width: one line naming pos_embed's two shapes, exit 2, nothing written."""
    state = _random_state(build_vit("vit_base_patch16_224", **SMALL))
    wider = dict(SMALL, embed_dim=96, num_heads=4)
    folder = _folder(tmp_path, "wrong", state, "model.safetensors", model_args=wider)
    out = tmp_path / "bags"
    rc = main(["features", str(slide), "--out", str(out), "--encoder", "timm", "--weights", str(folder),
               "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert "pos_embed (1, 17, 64) vs (1, 17, 96)" in err and "model.safetensors" in err
    assert not out.exists()
    # a ResNet-18 file named as timm's ResNet-50
    from napari_wsimil.features.resnet import resnet18

    _save(_random_state(resnet18()), tmp_path / "r18.safetensors")
    with pytest.raises(EncoderError) as e:
        build_encoder("timm:resnet50", weights=tmp_path / "r18.safetensors", device="cpu")
    msg = str(e.value)
    assert "\n" not in msg and "layer1.0.conv1.weight (64, 64, 3, 3) vs (64, 64, 1, 1)" in msg


def test_bad_requests(tmp_path) -> None:
    with pytest.raises(EncoderError, match="needs --weights FOLDER"):
        build_encoder("timm", device="cpu")
    (tmp_path / "empty").mkdir()
    with pytest.raises(EncoderError, match="no config.json"):
        build_encoder("timm", weights=tmp_path / "empty", device="cpu")
    state = _random_state(build_vit("vit_base_patch16_224", **SMALL))
    folder = _folder(tmp_path, "hub", state, "model.safetensors")
    with pytest.raises(EncoderError, match="is for vit_base_patch16_224, not vit_large_patch16_224"):
        build_encoder("timm:vit_large_patch16_224", weights=folder, device="cpu")
    (folder / "model.safetensors").unlink()
    with pytest.raises(EncoderError, match="no weights file"):
        build_encoder("timm", weights=folder, device="cpu")
    if not timm_importable():
        with pytest.raises(EncoderError, match="supported: .*vit_large_patch16_224.*any timm architecture"):
            build_encoder("timm:convnext_tiny", device="cpu")
        with pytest.raises(EncoderError, match="mlp_layer"):
            build_encoder("timm:vit_base_patch16_224", device="cpu", model_args={"mlp_layer": "swiglu"},
                          backend="native")
    assert "resnet50" in native_architectures()


def test_random_baseline_is_reproducible() -> None:
    a = build_encoder("timm:vit_base_patch16_224", device="cpu", model_args=SMALL, backend="native")
    b = build_encoder("timm:vit_base_patch16_224", device="cpu", model_args=SMALL, backend="native")
    patches = np.random.default_rng(2).integers(0, 256, (2, 40, 40, 3), dtype=np.uint8)
    np.testing.assert_array_equal(a.encode(patches), b.encode(patches))
    assert a.version.startswith("1+random0+") and a.input_size == 64


@pytest.mark.skipif(not timm_importable(), reason="timm does not import here (it needs a torchvision that "
                                                   "loads with this torch); the native nets are checked "
                                                   "against timm where it does")
@pytest.mark.parametrize("arch", ["vit_base_patch16_224", "vit_large_patch16_224", "resnet50"])
def test_native_equals_timm(arch: str) -> None:
    import timm

    args = {"num_classes": 0} if arch == "resnet50" else SMALL
    ref = timm.create_model(arch, pretrained=False, **args).eval()
    native = build_encoder(f"timm:{arch}", device="cpu", model_args=args, backend="native").module
    assert list(native.state_dict()) == list(ref.state_dict())
    state = _random_state(ref)
    ref.load_state_dict(state)
    native.load_state_dict(state)
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        np.testing.assert_allclose(native(x).numpy(), ref(x).numpy(), rtol=1e-5, atol=1e-5)
        if arch != "resnet50":  # dynamic_img_size: another grid, the position embedding resampled alike
            y = torch.randn(1, 3, 96, 96)
            np.testing.assert_allclose(native(y).numpy(), ref(y).numpy(), rtol=1e-5, atol=1e-5)
