"""ResNets in plain torch: shapes, torchvision key names, weight files round trip, readable errors."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from napari_wsimil.features import EncoderError, build_encoder  # noqa: E402
from napari_wsimil.features.resnet import resnet18, resnet50, resnet50_trunc  # noqa: E402


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.mark.parametrize(("factory", "dim"), [(resnet18, 512), (resnet50, 2048), (resnet50_trunc, 1024)])
def test_forward_shapes(factory, dim: int) -> None:
    model = factory().eval()
    with torch.inference_mode():
        out = model(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, dim) and model.out_dim == dim


def test_torchvision_key_names() -> None:
    keys = set(resnet18().state_dict())
    for k in ("conv1.weight", "bn1.running_mean", "layer1.0.bn1.running_mean", "layer2.0.downsample.0.weight",
              "layer2.0.downsample.1.num_batches_tracked", "layer4.1.conv2.weight", "fc.weight", "fc.bias"):
        assert k in keys, k
    keys50 = set(resnet50().state_dict())
    assert "layer1.0.conv3.weight" in keys50 and "layer1.0.downsample.0.weight" in keys50
    assert len(keys50) == 320  # torchvision resnet50().state_dict() has 320 entries
    assert len(keys) == 122  # and resnet18 122
    trunc = set(resnet50_trunc().state_dict())
    assert not any(k.startswith(("layer4.", "fc.")) for k in trunc) and trunc < keys50


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_weights_round_trip(tmp_path, suffix: str) -> None:
    src = build_encoder("resnet18", device="cpu")
    # BatchNorm statistics that are not the defaults, so that loading them is visible in the output
    for m in src.module.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    path = tmp_path / f"w{suffix}"
    state = {k: v.contiguous() for k, v in src.module.state_dict().items()}
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save(state, path)
    patches = np.random.default_rng(0).integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    torch.manual_seed(123)  # a different random init: equal outputs can only come from the file
    loaded = build_encoder("resnet18", weights=path, device="cpu")
    np.testing.assert_allclose(loaded.encode(patches), src.encode(patches), rtol=1e-5, atol=1e-5)
    assert loaded.version.startswith("1+") and loaded.version != "1+random0"


def test_full_resnet50_file_loads_into_truncated_trunk(tmp_path) -> None:
    full = resnet50()
    path = tmp_path / "resnet50.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in full.state_dict().items()}}, path)  # wrapped
    enc = build_encoder("resnet50-trunc", weights=path, device="cpu")
    x = torch.randn(1, 3, 64, 64)
    full.eval()
    with torch.inference_mode():
        ref = torch.flatten(full.avgpool(full.layer3(full.layer2(full.layer1(
            full.maxpool(full.relu(full.bn1(full.conv1(x)))))))), 1)
        assert torch.allclose(enc.module(x), ref, atol=1e-5)
    assert enc.dim == 1024


def test_wrong_file_gives_readable_error(tmp_path) -> None:
    path = tmp_path / "r18.safetensors"
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in resnet18().state_dict().items()}, str(path))
    with pytest.raises(EncoderError) as err:
        build_encoder("resnet50", weights=path, device="cpu")
    msg = str(err.value)
    assert "r18.safetensors" in msg and "missing" in msg and "layer1.0.conv3.weight" in msg
    assert "another shape" in msg and "fc.weight" in msg

    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(EncoderError, match="junk.pth.*not a readable weights file"):
        build_encoder("resnet18", weights=junk, device="cpu")
    with pytest.raises(EncoderError, match="does not exist"):
        build_encoder("resnet18", weights=tmp_path / "absent.pth", device="cpu")
    with pytest.raises(EncoderError, match="no encoder named"):
        build_encoder("vit-huge")


def test_resize_input_and_old_files_without_batch_counters(tmp_path) -> None:
    enc = build_encoder("resnet50-trunc", device="cpu", input_size=32)  # CLAM resizes 256 -> 224
    patches = np.random.default_rng(2).integers(0, 256, (2, 48, 48, 3), dtype=np.uint8)
    assert enc.encode(patches).shape == (2, 1024)
    assert enc.version == "1+random0"
    state = {k: v for k, v in resnet18().state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(state, tmp_path / "old.pth")  # as torch < 0.4.1 wrote them
    assert build_encoder("resnet18", weights=tmp_path / "old.pth", device="cpu").dim == 512


def test_importing_features_does_not_import_torch() -> None:
    import subprocess
    import sys

    code = ("import sys, numpy as np; import napari_wsimil.features as f; "
            "f.build_encoder('handcrafted').encode(np.zeros((1, 32, 32, 3), np.uint8)); "
            "assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
