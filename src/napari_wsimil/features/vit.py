"""Vision Transformers in plain torch, with timm's parameter names and timm's forward arithmetic.

Why: pathology foundation models (UNI is a ``vit_large_patch16_224``) are published as timm state
dicts, but timm imports torchvision, which does not load beside every torch build (its PyPI wheels
need a CUDA torch). Writing the few classes here with the *same attribute names* as
``timm.models.vision_transformer.VisionTransformer`` (``patch_embed.proj``, ``cls_token``,
``pos_embed``, ``blocks.N.{norm1,attn.qkv,attn.proj,ls1.gamma,norm2,mlp.fc1,mlp.fc2,ls2.gamma}``,
``norm``, ``fc_norm``) lets those files load with strict key checking and no conversion; the
operations are timm's (LayerNorm eps 1e-6, exact GELU, fused scaled-dot-product attention, bicubic
antialiased position-embedding resampling for ``dynamic_img_size``), so features equal timm's.

Only what a feature extractor needs is here: no classifier head (``num_classes=0``), no dropout or
stochastic depth (inference), pooling by class token, mean or max of patch tokens.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

#: Architectures of timm's registry this module builds, with timm's own arguments for them.
ARCHITECTURES: dict[str, dict[str, Any]] = {
    "vit_tiny_patch16_224": dict(patch_size=16, embed_dim=192, depth=12, num_heads=3),
    "vit_small_patch16_224": dict(patch_size=16, embed_dim=384, depth=12, num_heads=6),
    "vit_small_patch8_224": dict(patch_size=8, embed_dim=384, depth=12, num_heads=6),
    "vit_base_patch16_224": dict(patch_size=16, embed_dim=768, depth=12, num_heads=12),
    "vit_base_patch8_224": dict(patch_size=8, embed_dim=768, depth=12, num_heads=12),
    "vit_large_patch16_224": dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16),
}

#: ``VisionTransformer`` arguments this module implements (timm's names); others need timm itself.
SUPPORTED_ARGS = frozenset({
    "img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads", "mlp_ratio", "qkv_bias",
    "init_values", "class_token", "reg_tokens", "no_embed_class", "pre_norm", "final_norm", "fc_norm",
    "global_pool", "dynamic_img_size", "num_classes",
})
#: Arguments that change training only (dropout rates, initialisation): accepted and ignored.
INFERENCE_NOOP_ARGS = frozenset({
    "drop_rate", "pos_drop_rate", "patch_drop_rate", "proj_drop_rate", "attn_drop_rate", "drop_path_rate",
    "weight_init", "fix_init",
})


def _pair(v: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


class PatchEmbed(nn.Module):
    """A strided convolution cutting the image into ``patch_size`` squares (``proj``)."""

    def __init__(self, img_size: tuple[int, int], patch_size: tuple[int, int], in_chans: int, embed_dim: int,
                 bias: bool = True):
        super().__init__()
        self.img_size, self.patch_size = img_size, patch_size
        self.grid_size = (img_size[0] // patch_size[0], img_size[1] // patch_size[1])
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) → (B, H/p, W/p, D), channels last like timm's ``output_fmt='NHWC'``."""
        return self.proj(x).permute(0, 2, 3, 1)


class Attention(nn.Module):
    """Multi-head self-attention with one fused ``qkv`` projection and an output ``proj``."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    """``fc1`` → exact GELU → ``fc2``."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class LayerScale(nn.Module):
    """Per-channel scale of a residual branch (``gamma``), as UNI and DINOv2-style models use."""

    def __init__(self, dim: int, init_values: float = 1e-5):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


def _layer_norm(dim: int) -> nn.LayerNorm:
    return nn.LayerNorm(dim, eps=1e-6)  # timm's LayerNorm default, not torch's 1e-5


class Block(nn.Module):
    """Pre-norm transformer block: x + ls1(attn(norm1(x))), then x + ls2(mlp(norm2(x)))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 init_values: float | None = None):
        super().__init__()
        self.norm1 = _layer_norm(dim)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.ls1: nn.Module = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.norm2 = _layer_norm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.ls2: nn.Module = LayerScale(dim, init_values) if init_values else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


def resample_pos_embed(pos: torch.Tensor, new_size: tuple[int, int], old_size: tuple[int, int],
                       num_prefix_tokens: int) -> torch.Tensor:
    """timm's ``resample_abs_pos_embed``: bicubic, antialiased, prefix (class/register) tokens kept."""
    if new_size == old_size:
        return pos
    prefix, grid = pos[:, :num_prefix_tokens], pos[:, num_prefix_tokens:]
    dim, dtype = grid.shape[-1], grid.dtype
    grid = grid.float().reshape(1, old_size[0], old_size[1], dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=new_size, mode="bicubic", antialias=True)
    grid = grid.permute(0, 2, 3, 1).reshape(1, -1, dim).to(dtype)
    return torch.cat([prefix, grid], dim=1) if num_prefix_tokens else grid


class VisionTransformer(nn.Module):
    """timm's ``VisionTransformer`` with ``num_classes=0``: ``forward`` gives the pooled feature (B, D).

    Arguments are timm's (see :data:`SUPPORTED_ARGS`); ``global_pool`` is "token" (class token),
    "avg", "max" or "avgmax" of the patch tokens (timm's default ``fc_norm`` then normalises after
    pooling instead of before). ``num_classes`` other than 0 is refused: a feature extractor has no head.
    """

    def __init__(self, img_size: int | tuple[int, int] = 224, patch_size: int | tuple[int, int] = 16,
                 in_chans: int = 3, embed_dim: int = 768, depth: int = 12, num_heads: int = 12,
                 mlp_ratio: float = 4.0, qkv_bias: bool = True, init_values: float | None = None,
                 class_token: bool = True, reg_tokens: int = 0, no_embed_class: bool = False,
                 pre_norm: bool = False, final_norm: bool = True, fc_norm: bool | None = None,
                 global_pool: str = "token", dynamic_img_size: bool = False, num_classes: int = 0):
        super().__init__()
        if num_classes:
            raise ValueError("a feature extractor has no classifier head: num_classes must be 0")
        if global_pool not in ("token", "avg", "max", "avgmax"):
            raise ValueError(f"global_pool {global_pool!r} is not supported (token, avg, max, avgmax): "
                             "the encoder needs one feature vector per patch")
        if global_pool == "token" and not class_token:
            raise ValueError("token pooling needs the class token")
        use_fc_norm = global_pool in ("avg", "max", "avgmax") if fc_norm is None else bool(fc_norm)
        self.global_pool = global_pool
        self.dynamic_img_size = bool(dynamic_img_size)
        self.no_embed_class = bool(no_embed_class)
        self.num_prefix_tokens = int(bool(class_token)) + int(reg_tokens)
        self.out_dim = self.num_features = self.embed_dim = int(embed_dim)
        self.patch_embed = PatchEmbed(_pair(img_size), _pair(patch_size), in_chans, embed_dim,
                                      bias=not pre_norm)  # CLIP-style pre-norm models have no bias
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if class_token else None
        self.reg_token = nn.Parameter(torch.zeros(1, reg_tokens, embed_dim)) if reg_tokens else None
        n_pos = self.patch_embed.num_patches + (0 if no_embed_class else self.num_prefix_tokens)
        self.pos_embed = nn.Parameter(torch.zeros(1, n_pos, embed_dim))
        self.norm_pre: nn.Module = _layer_norm(embed_dim) if pre_norm else nn.Identity()
        self.blocks = nn.Sequential(*[Block(embed_dim, num_heads, mlp_ratio, qkv_bias, init_values)
                                      for _ in range(depth)])
        self.norm: nn.Module = _layer_norm(embed_dim) if final_norm and not use_fc_norm else nn.Identity()
        self.fc_norm: nn.Module = _layer_norm(embed_dim) if final_norm and use_fc_norm else nn.Identity()
        self._init_weights()

    def _init_weights(self) -> None:
        """timm's default initialisation, so a random-weight baseline is drawn the way timm's is."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02, a=-2.0, b=2.0)
        for token in (self.cls_token, self.reg_token):
            if token is not None:
                nn.init.normal_(token, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02, a=-2.0, b=2.0)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        pos = self.pos_embed
        if self.dynamic_img_size:
            pos = resample_pos_embed(pos, (h, w), self.patch_embed.grid_size,
                                     0 if self.no_embed_class else self.num_prefix_tokens)
        elif (h, w) != self.patch_embed.grid_size:
            raise ValueError(f"input of {h}x{w} patches, the model takes {self.patch_embed.grid_size} "
                             "(resize the input or build with dynamic_img_size=True)")
        x = x.reshape(b, -1, c)
        prefix = [t.expand(b, -1, -1) for t in (self.cls_token, self.reg_token) if t is not None]
        if self.no_embed_class:
            x = x + pos
            return torch.cat(prefix + [x], dim=1) if prefix else x
        if prefix:
            x = torch.cat(prefix + [x], dim=1)
        return x + pos

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """All tokens after the last block and the final norm, (B, N, D)."""
        x = self.norm_pre(self._pos_embed(self.patch_embed(x)))
        return self.norm(self.blocks(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_features(x)
        if self.global_pool == "token":
            x = x[:, 0]
        else:
            tokens = x[:, self.num_prefix_tokens:]
            if self.global_pool == "avg":
                x = tokens.mean(dim=1)
            elif self.global_pool == "max":
                x = tokens.amax(dim=1)
            else:
                x = 0.5 * (tokens.amax(dim=1) + tokens.mean(dim=1))
        return self.fc_norm(x)

    def ignorable_keys(self) -> tuple[str, ...]:
        """Key prefixes of a file that this trunk may drop without complaint: a classifier head."""
        return ("head.",)


def vit_args(arch: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The constructor arguments of ``arch`` (timm's defaults) with ``overrides`` on top.

    Raises ``KeyError`` for an unknown architecture and ``ValueError`` naming arguments this module
    does not implement (they need timm itself).
    """
    args = dict(ARCHITECTURES[arch])
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - SUPPORTED_ARGS - INFERENCE_NOOP_ARGS)
    if unknown:
        raise ValueError(f"model_args {', '.join(unknown)} of {arch} are not implemented without timm")
    args.update({k: v for k, v in overrides.items() if k in SUPPORTED_ARGS})
    args["num_classes"] = 0
    return args


def build_vit(arch: str, **overrides: Any) -> VisionTransformer:
    """``timm.create_model(arch, num_classes=0, **overrides)``, natively."""
    return VisionTransformer(**vit_args(arch, overrides))


__all__ = ["ARCHITECTURES", "SUPPORTED_ARGS", "VisionTransformer", "build_vit", "resample_pos_embed",
           "vit_args"]
