"""``timm:ARCH`` encoders: the foundation models users keep on disk, with or without timm installed.

Why: pathology foundation models (UNI: ``vit_large_patch16_224``; ImageNet ResNet-50 trunks) are
published as timm state dicts, often as a Hugging Face hub folder (``config.json`` with the
architecture, its ``model_args`` and the preprocessing in ``pretrained_cfg``, beside
``model.safetensors`` or ``pytorch_model.bin``). Nothing is downloaded: the user names the file or
the folder. When timm imports (a torch whose torchvision loads), ``timm.create_model`` builds the
network, so any timm architecture works; without it, :mod:`.vit` and :mod:`.resnet` build the
architectures in :data:`NATIVE` with timm's parameter names and arithmetic (the features are the
same; a test checks it where timm imports).

The encoder's version is ``1+<weights SHA-256>+<config hash>``: other weights, or another
architecture, normalisation or input size, make earlier feature bags stale. Which library ran the
network is not part of it, since both give the same features.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .encoder_base import IMAGENET_MEAN, IMAGENET_STD, Builder, EncoderError, TorchEncoder
from .weights import file_digest, load_weights, read_state_dict, seeded_init

if TYPE_CHECKING:  # pragma: no cover
    import torch

#: Encoders listed by ``available_encoders()`` (any other ``timm:ARCH`` is built on request).
LISTED = {
    "vit_large_patch16_224": "ViT-L/16, 1024-d (UNI's architecture; timm weights file or folder)",
    "vit_base_patch16_224": "ViT-B/16, 768-d (timm weights file or folder)",
    "resnet50": "timm/torchvision ResNet-50 trunk, global-average-pooled 2048-d "
                "(timm weights file or folder)",
}
#: Weights file names looked for in a folder, in order (safetensors first: it cannot run code).
FOLDER_WEIGHTS = ("model.safetensors", "pytorch_model.safetensors", "pytorch_model.bin", "model.pth",
                  "model.pt")


def native_architectures() -> list[str]:
    """The architectures built without timm."""
    from .vit import ARCHITECTURES

    return sorted([*ARCHITECTURES, "resnet50"])


@lru_cache(maxsize=1)
def timm_importable() -> bool:
    """Whether ``import timm`` works here. Not only ImportError: with a torchvision built for another
    torch, importing timm fails while loading torchvision's operators (RuntimeError)."""
    try:
        import timm  # noqa: F401
    except Exception:  # noqa: BLE001
        return False
    return True


@dataclass
class TimmConfig:
    """What builds and feeds one model: timm's architecture name, its arguments and its preprocessing."""

    arch: str
    model_args: dict[str, Any] = field(default_factory=dict)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    input_size: int | None = None
    interpolation: str = "bilinear"
    weights_file: Path | None = None

    def digest(self) -> str:
        """A short hash of everything here that changes the features (not the weights' location)."""
        text = json.dumps({"arch": self.arch, "model_args": self.model_args, "mean": list(self.mean),
                           "std": list(self.std), "input_size": self.input_size,
                           "interpolation": self.interpolation}, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:8]


def _strip_tag(arch: str) -> str:
    """``vit_large_patch16_224.uni_mass100k`` → ``vit_large_patch16_224`` (timm's pretrained tag)."""
    arch = arch.strip()
    for prefix in ("timm/", "timm:"):
        if arch.startswith(prefix):
            arch = arch[len(prefix):]
    return arch.split(".", 1)[0]


def read_timm_folder(folder: str | Path) -> TimmConfig:
    """The architecture, model arguments and preprocessing of a Hugging Face hub style timm folder.

    Reads ``config.json`` as timm's ``_hub.py`` writes it (``architecture``, ``model_args``,
    ``pretrained_cfg`` with ``mean``, ``std``, ``input_size``, ``interpolation``), or the older
    single-dict layout, and finds the weights file beside it.
    """
    folder = Path(folder).expanduser()
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise EncoderError(f"{folder} has no config.json: name the weights file itself and the architecture "
                           "(--encoder timm:ARCH --weights FILE)")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EncoderError(f"{cfg_path} is not readable JSON: {exc}") from exc
    if not isinstance(cfg, dict) or not isinstance(cfg.get("architecture"), str):
        raise EncoderError(f"{cfg_path} does not name an architecture "
                           "(an \"architecture\" entry, as timm writes)")
    pretrained = cfg.get("pretrained_cfg", cfg)
    if not isinstance(pretrained, dict):
        pretrained = {}
    model_args = cfg.get("model_args") or {}
    if not isinstance(model_args, dict):
        raise EncoderError(f"{cfg_path}: model_args must be a mapping, got {type(model_args).__name__}")
    weights = next((folder / n for n in FOLDER_WEIGHTS if (folder / n).is_file()), None)
    if weights is None:
        raise EncoderError(f"{folder} holds config.json but no weights file ({', '.join(FOLDER_WEIGHTS)})")
    out = TimmConfig(_strip_tag(cfg["architecture"]), dict(model_args), weights_file=weights)
    try:
        if "mean" in pretrained:
            out.mean = _triple(pretrained["mean"])
        if "std" in pretrained:
            out.std = _triple(pretrained["std"])
        size = pretrained.get("input_size")
        if size is not None:
            h, w = (int(v) for v in list(size)[-2:])
            if h != w:
                raise EncoderError(f"{cfg_path}: input_size {h}x{w} is not square; patches are square")
            out.input_size = h
    except (TypeError, ValueError) as exc:
        raise EncoderError(f"{cfg_path}: unreadable mean/std/input_size in pretrained_cfg: {exc}") from exc
    if pretrained.get("interpolation") in ("bilinear", "bicubic"):
        out.interpolation = pretrained["interpolation"]
    return out


def _triple(values: Any) -> tuple[float, float, float]:
    v = [float(x) for x in values]
    if len(v) == 1:
        v = v * 3
    if len(v) != 3:
        raise ValueError(f"expected 3 channel values, got {len(v)}")
    return (v[0], v[1], v[2])


def _infer_from_state(arch: str, state: dict[str, Any], model_args: dict[str, Any]) -> dict[str, Any]:
    """Arguments a bare ViT state dict shows unambiguously and its architecture name does not:
    layer scale (``blocks.0.ls1.gamma``, as UNI has) and register tokens. Named arguments win."""
    args = dict(model_args)
    if not arch.startswith("vit_"):
        return args
    if "init_values" not in args and "blocks.0.ls1.gamma" in state:
        args["init_values"] = 1e-5  # the value is the file's; any non-zero value builds the layer
    reg = state.get("reg_token")
    if "reg_tokens" not in args and reg is not None and getattr(reg, "ndim", 0) == 3:
        args["reg_tokens"] = int(reg.shape[1])
    return args


def _native_module(arch: str, model_args: dict[str, Any]) -> torch.nn.Module:
    from . import vit

    if arch in vit.ARCHITECTURES:
        try:
            return vit.build_vit(arch, **model_args)
        except (TypeError, ValueError) as exc:
            raise EncoderError(f"timm:{arch}: {exc} (install timm to build it: pip install "
                               "'napari-wsimil[timm]', with a torch whose torchvision loads)") from exc
    if arch == "resnet50":
        from .resnet import resnet50

        extra = sorted(k for k in model_args if k not in ("num_classes", *vit.INFERENCE_NOOP_ARGS))
        if extra:
            raise EncoderError(f"timm:resnet50: model_args {', '.join(extra)} are not implemented "
                               "without timm")
        module = resnet50()
        module.fc = None  # timm's num_classes=0: no classifier, the pooled 2048-d trunk
        return module
    supported = ", ".join(native_architectures())
    raise EncoderError(f"timm architecture {arch!r} is not built without timm, which does not import here; "
                       f"supported: {supported}, or any timm architecture when timm is importable "
                       "(pip install 'napari-wsimil[timm]' with a torch whose torchvision loads)")


def _timm_module(arch: str, model_args: dict[str, Any]) -> torch.nn.Module:
    import timm

    try:
        return timm.create_model(arch, pretrained=False, **{**model_args, "num_classes": 0})
    except RuntimeError as exc:  # timm's "Unknown model"
        raise EncoderError(f"timm has no architecture {arch!r}: {exc}") from exc
    except TypeError as exc:  # an argument the architecture does not take
        raise EncoderError(f"timm:{arch}: {exc}") from exc


def _is_transformer(module: torch.nn.Module) -> bool:
    """Transformers need the input size their position embedding was trained for; CNNs do not."""
    return hasattr(module, "patch_embed") or hasattr(module, "pos_embed")


def build_timm_encoder(arch: str | None, weights: str | Path | None = None, device: str = "auto", *,
                       model_args: dict[str, Any] | None = None, backend: str = "auto",
                       input_size: int | None = None, half: bool = False,
                       mean: tuple[float, float, float] | None = None,
                       std: tuple[float, float, float] | None = None) -> TorchEncoder:
    """The ``timm:ARCH`` encoder with ``weights`` (a file, or a folder with config.json; None: a
    seeded random net, a baseline).

    ``arch`` None takes the architecture from the folder's config.json. ``model_args`` are timm's
    architecture arguments on top of the folder's (``depth``, ``init_values``...). ``backend`` is
    "auto" (timm when it imports, else native), "timm" or "native". ``input_size``, ``mean`` and
    ``std`` override the preprocessing; ViTs resize every patch to their input size (224 unless
    the config says otherwise), CNNs keep the patch size unless ``input_size`` is given.
    """
    import torch

    if backend not in ("auto", "timm", "native"):
        raise EncoderError(f"backend must be auto, timm or native, got {backend!r}")
    cfg: TimmConfig
    if weights is not None and Path(weights).expanduser().is_dir():
        cfg = read_timm_folder(weights)
        if arch is not None and _strip_tag(arch) != cfg.arch:
            raise EncoderError(f"{Path(weights).expanduser() / 'config.json'} is for {cfg.arch}, "
                               f"not {_strip_tag(arch)}: use --encoder timm (or timm:{cfg.arch})")
    elif arch is None:
        raise EncoderError("--encoder timm needs --weights FOLDER holding timm's config.json; for a "
                           "weights file name the architecture: --encoder timm:ARCH "
                           "(e.g. timm:vit_large_patch16_224)")
    else:
        file = None if weights is None else Path(weights).expanduser()
        cfg = TimmConfig(_strip_tag(arch), weights_file=file)
    cfg.model_args.update(model_args or {})
    cfg.model_args.pop("num_classes", None)
    if mean is not None:
        cfg.mean = _triple(mean)
    if std is not None:
        cfg.std = _triple(std)

    use_timm = backend == "timm" or (backend == "auto" and timm_importable())
    if backend == "timm" and not timm_importable():
        raise EncoderError("backend 'timm' asked for, but timm does not import here")
    state = None
    if cfg.weights_file is not None:
        state = read_state_dict(cfg.weights_file)
        cfg.model_args = _infer_from_state(cfg.arch, state, cfg.model_args)

    def make() -> torch.nn.Module:
        build = _timm_module if use_timm else _native_module
        return build(cfg.arch, cfg.model_args)

    if state is None:
        module = seeded_init(make)  # a fixed random net, the same in every process
        weights_tag = "random0"
    else:
        if use_timm:
            module = make()
            assign = False
        else:  # skip the random initialisation the file overwrites (seconds, and 1.2 GB, for ViT-L)
            with torch.device("meta"):
                module = make()
            assign = True
        own = module.state_dict()
        ignorable = tuple(p for p in ("head.", "fc.", "head_dist.") if not any(k.startswith(p) for k in own))
        load_weights(module, cfg.weights_file, ignorable=ignorable, state=state, assign=assign)
        weights_tag = file_digest(cfg.weights_file)
    dim = int(getattr(module, "num_features", 0) or getattr(module, "out_dim", 0))
    if _is_transformer(module):
        cfg.input_size = input_size or cfg.input_size or _img_size(module) or 224
    else:
        cfg.input_size = input_size  # a pooled CNN takes the patch as it is
    version = f"1+{weights_tag}+{cfg.digest()}"
    return TorchEncoder(module, f"timm:{cfg.arch}", version, dim, input_size=cfg.input_size, device=device,
                        half=half, mean=cfg.mean, std=cfg.std, interpolation=cfg.interpolation)


def _img_size(module: torch.nn.Module) -> int | None:
    size = getattr(getattr(module, "patch_embed", None), "img_size", None)
    if size is None:
        return None
    return int(size if isinstance(size, int) else size[0])


def timm_builder(arch: str | None) -> Builder:
    """The registry's builder for ``timm:ARCH`` (``arch`` None: ``timm``, the folder's architecture)."""
    def build(weights: str | Path | None = None, device: str = "auto", **options: Any) -> TorchEncoder:
        return build_timm_encoder(arch, weights=weights, device=device, **options)

    return build


__all__ = ["FOLDER_WEIGHTS", "LISTED", "TimmConfig", "build_timm_encoder", "native_architectures",
           "read_timm_folder", "timm_builder", "timm_importable"]
