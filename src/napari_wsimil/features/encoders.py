"""Patch encoders: the registry of named builders, and the one place that builds an encoder by name.

Every encoder has a ``name`` and a ``version``; both are written into each feature bag so that a bag
made with other weights, or by an older feature definition, is recognised as stale and recomputed
instead of silently mixed with new ones. Weights come from a local file the user names (nothing can
be downloaded); the file's content hash is part of the version.

Layering: the ``Encoder`` interface and spec types live in :mod:`.encoder_base`, the weights helpers
in :mod:`.weights`; the concrete encoders build on those, and this module sits on top, importing the
concrete ones (on first use) to register them. It re-exports the base names, so
``napari_wsimil.features.encoders.Encoder`` (what a plugin subclasses) and ``load_weights`` stay here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .encoder_base import IMAGENET_MEAN, IMAGENET_STD, Builder, Encoder, EncoderError, EncoderSpec, TorchEncoder, \
    resolve_device
from .weights import file_digest, load_weights, read_state_dict, seeded_init

# --- registry -------------------------------------------------------------------------------------

_REGISTRY: dict[str, EncoderSpec] = {}


def register_encoder(name: str, builder: Builder, description: str = "", takes_weights: bool = False) -> None:
    """Add (or replace) an encoder; ``builder(weights=None, device="auto", **options) -> Encoder``."""
    _REGISTRY[name] = EncoderSpec(name, builder, description, takes_weights)


def available_encoders() -> dict[str, EncoderSpec]:
    """Every encoder by name: the built-in ones, ``timm:ARCH`` for the architectures built without
    timm, and those other packages register under the ``napari_wsimil.encoders`` entry-point group
    (loaded on the first call; :func:`refresh_encoders` looks again)."""
    _ensure_registry()
    return dict(_REGISTRY)


def refresh_encoders() -> dict[str, EncoderSpec]:
    """Forget the entry-point encoders found so far and look for them again.

    For a package installed (or a folder put on ``sys.path``) after the first look: the entry points
    themselves are read afresh each time, only this registry remembers.
    """
    global _PLUGINS_DONE
    for name in [n for n, spec in _REGISTRY.items() if spec.source != "builtin"]:
        del _REGISTRY[name]
    _BROKEN_PLUGINS.clear()
    _PLUGINS_DONE = False
    return available_encoders()


def build_encoder(name: str, weights: str | Path | None = None, device: str = "auto",
                  **options: Any) -> Encoder:
    """The encoder registered as ``name``, with weights from a local file where it takes any.

    ``timm:ARCH`` builds any architecture of timm's registry when timm imports, and those of
    :mod:`.timm_encoders` without it; ``timm`` alone takes the architecture from ``weights``, a
    folder holding timm's ``config.json``.
    """
    if isinstance(name, Encoder):
        return name
    if name.startswith("imported:"):  # see .interop: bags made elsewhere have no network to run here
        raise EncoderError(f"{name} names features imported from files (wsimil features-import); they cannot be "
                           "computed for new patches or zoom levels here: import the features of every slide "
                           "it needs, or use one of our encoders")
    _register_builtins()
    _register_timm()
    spec = _REGISTRY.get(name)
    if spec is None:  # plugins are imported only when a name is not a built-in one
        _register_plugins()
        spec = _REGISTRY.get(name)
    if spec is None and name.startswith(TIMM_PREFIX + ":"):
        from .timm_encoders import build_timm_encoder

        return build_timm_encoder(name[len(TIMM_PREFIX) + 1:], weights=weights, device=device, **options)
    if spec is None:
        if name in _BROKEN_PLUGINS:
            raise EncoderError(f"encoder {name!r} could not be loaded: {_BROKEN_PLUGINS[name]}")
        raise EncoderError(f"no encoder named {name!r}; choose one of {', '.join(sorted(_REGISTRY))}, "
                           f"or {TIMM_PREFIX}:ARCH (see `wsimil encoders`)")
    return spec.builder(weights=weights, device=device, **options)


def _resnet_builder(arch: str) -> Builder:
    def build(weights: str | Path | None = None, device: str = "auto", input_size: int | None = None,
              half: bool = False) -> Encoder:
        from . import resnet

        factory = {"resnet18": resnet.resnet18, "resnet50": resnet.resnet50,
                   "resnet50-trunc": resnet.resnet50_trunc}[arch]
        if weights is not None:
            module = factory()
            load_weights(module, weights, ignorable=module.ignorable_keys())
            version = f"1+{file_digest(weights)}"
        else:
            module = seeded_init(factory)  # a fixed random net: a baseline, the same in every run
            version = "1+random0"
        return TorchEncoder(module, arch, version, module.out_dim, input_size=input_size, device=device,
                            half=half)

    return build


def _handcrafted_builder(weights: str | Path | None = None, device: str = "auto", **options: Any) -> Encoder:
    from .handcrafted import HandcraftedEncoder

    if weights is not None:
        raise EncoderError("the handcrafted encoder takes no weights file")
    return HandcraftedEncoder(**options)


def _ssl_builder(weights: str | Path | None = None, device: str = "auto", **options: Any) -> Encoder:
    from .ssl import build_ssl_encoder

    return build_ssl_encoder(weights, device=device, **options)


_BUILTINS_DONE = False


def _register_builtins() -> None:
    global _BUILTINS_DONE
    if _BUILTINS_DONE:
        return
    _BUILTINS_DONE = True
    for name, text in (
        ("resnet18", "ResNet-18 trunk, 512-d (torchvision weights file)"),
        ("resnet50", "ResNet-50 trunk, 2048-d (torchvision weights file)"),
        ("resnet50-trunc",
         "ResNet-50 up to layer3, 1024-d: CLAM's default (torchvision ResNet-50 weights file)"),
    ):
        _REGISTRY.setdefault(name, EncoderSpec(name, _resnet_builder(name), text, takes_weights=True))
    _REGISTRY.setdefault("ssl-ae", EncoderSpec(
        "ssl-ae", _ssl_builder, "compact CNN auto-encoder trained on the project's own patches, 128-d "
        "(features.ssl.project_ssl_encoder makes its weights file)", takes_weights=True))
    _REGISTRY.setdefault("handcrafted", EncoderSpec(
        "handcrafted", _handcrafted_builder, "stain histograms (HED, HSV) + gradient and LBP texture, 76-d"))
    from .handcrafted_v2 import DIM, build_handcrafted_v2
    from .simclr import build_simclr_encoder

    _REGISTRY.setdefault("handcrafted-v2", EncoderSpec(
        "handcrafted-v2", build_handcrafted_v2, f"stain, nuclear size/shape/density (haematoxylin) and "
        f"multi-scale texture (LBP, GLCM), {DIM}-d; option mpp: the patches' µm/px (default 0.5)"))
    _REGISTRY.setdefault("ssl-simclr", EncoderSpec(
        "ssl-simclr", build_simclr_encoder, "small ResNet trained contrastively (SimCLR) on the cohort's own "
        "patches, 256-d (features.simclr.project_simclr_encoder makes its weights file)", takes_weights=True))


# --- timm architectures and entry-point plugins ---------------------------------------------------
# Kept apart from _register_builtins: these are found (timm) or loaded (plugins) rather than listed.

#: ``timm:ARCH`` names a timm architecture; ``timm`` alone reads it from a weights folder's config.json.
TIMM_PREFIX = "timm"
_PLUGINS_DONE = False
_TIMM_DONE = False
#: Entry-point encoders that failed to load: name → why (build_encoder repeats it).
_BROKEN_PLUGINS: dict[str, str] = {}


def _ensure_registry() -> None:
    _register_builtins()
    _register_timm()
    _register_plugins()


def _register_timm() -> None:
    global _TIMM_DONE
    if _TIMM_DONE:
        return
    _TIMM_DONE = True
    from .timm_encoders import LISTED, timm_builder

    _REGISTRY.setdefault(TIMM_PREFIX, EncoderSpec(
        TIMM_PREFIX, timm_builder(None), "a timm model from a folder holding config.json and "
        "model.safetensors or pytorch_model.bin (as saved from the Hugging Face hub): --weights FOLDER",
        takes_weights=True))
    for arch, text in LISTED.items():
        name = f"{TIMM_PREFIX}:{arch}"
        _REGISTRY.setdefault(name, EncoderSpec(name, timm_builder(arch), text, takes_weights=True))


def _register_plugins() -> None:
    global _PLUGINS_DONE
    if _PLUGINS_DONE:
        return
    _PLUGINS_DONE = True
    from .plugins import discover_encoders

    specs, broken = discover_encoders(reserved=set(_REGISTRY))
    for spec in specs:
        _REGISTRY[spec.name] = spec
    _BROKEN_PLUGINS.update(broken)


__all__ = [
    "Encoder", "TorchEncoder", "EncoderError", "EncoderSpec", "IMAGENET_MEAN", "IMAGENET_STD",
    "available_encoders", "build_encoder", "register_encoder", "load_weights", "read_state_dict",
    "resolve_device", "file_digest", "seeded_init", "refresh_encoders", "TIMM_PREFIX", "Builder",
]
