"""Loading a run's weights for prediction, whatever its family: ``best`` (by validation) or ``last``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..infer.predictions import RunError


def load_checkpoint_weights(run: Path, model: Any, weights: str, device: str) -> Any:
    """Load ``best`` (or ``last``) weights of a run folder into ``model``, move it to ``device`` in eval mode;
    returns the torch device."""
    from .engine import load_model_weights, pick_device

    src = run / "best.safetensors" if weights == "best" and (run / "best.safetensors").is_file() else run / "last.json"
    try:
        load_model_weights(src, model)
    except (OSError, RuntimeError, ValueError, KeyError) as exc:
        raise RunError(f"cannot load the weights {src}: {exc}") from exc
    dev = pick_device(device)
    model.to(dev).eval()
    return dev


__all__ = ["load_checkpoint_weights"]
