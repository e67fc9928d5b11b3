"""Fully convolutional segmentation networks for weakly and mixed supervised training.

* :class:`SegUNet` — the U-Net of Pinchaud (2024): separable convolutions, residual blocks, batch norm,
  32 filters in the first level doubling per level. ``skips=False`` is the same net without lateral skip
  connections, which is the auto-encoder the paper pre-trains with an L2 reconstruction loss
  (:func:`autoencoder_pretrain_net`, :func:`reconstruction_loss`, :func:`transfer_encoder`).
* :class:`DualDecoderNet` — ConfKD (Liu et al. 2022): one shared encoder, a teacher decoder (strong labels)
  and a student decoder (weak labels) of the same shape.
* :func:`receptive_margin` — context to add around a tile so that tiled inference has no seams.
* :func:`build_net` — the net a segmentation config asks for (training builds it, and so does loading a run).

Everything is padded 'same' and built from stride-2 pooling / stride-2 transposed convolutions only, so the
nets are translation equivariant on the grid of ``2**(depth-1)`` pixels: they are trained on 64–128 px
patches and run on large tiles (1024 px and more) at inference.
"""

from __future__ import annotations

import copy
from itertools import pairwise
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class SepConv2d(nn.Sequential):
    """3×3 depthwise then 1×1 pointwise convolution: ~8× fewer weights than a full 3×3 at 32+ channels,
    which is what keeps the net trainable on a CPU."""

    def __init__(self, cin: int, cout: int):
        super().__init__(
            nn.Conv2d(cin, cin, 3, padding=1, groups=cin, bias=False),
            nn.Conv2d(cin, cout, 1, bias=False),
        )


class ResBlock(nn.Module):
    """Two separable convolutions with batch norm and a residual shortcut (1×1 conv when channels change).

    The shortcut keeps gradients flowing through the deep, narrow separable stack from the first steps.
    """

    #: 3×3 convolutions on the longest path through one block (used by :func:`receptive_margin`).
    N_CONV3 = 2

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.body = nn.Sequential(
            SepConv2d(cin, cout), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
            SepConv2d(cout, cout), nn.BatchNorm2d(cout),
        )
        self.shortcut: nn.Module = (
            nn.Identity() if cin == cout
            else nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.body(x) + self.shortcut(x))


def _channels(width: int, depth: int) -> list[int]:
    return [width * 2**level for level in range(depth)]


class UNetEncoder(nn.Module):
    """Stem 3×3 conv, then one :class:`ResBlock` per level with a 2×2 max-pool between levels.

    Returns the feature map of every level (finest first): the decoder needs them for its lateral skips.
    """

    def __init__(self, in_channels: int = 3, width: int = 32, depth: int = 4):
        super().__init__()
        if depth < 1 or width < 1 or in_channels < 1:
            raise ValueError(
                f"need depth >= 1, width >= 1, in_channels >= 1; got {depth}, {width}, {in_channels}")
        self.in_channels, self.width, self.depth = in_channels, width, depth
        self.channels = _channels(width, depth)
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(width), nn.ReLU(inplace=True))
        self.blocks = nn.ModuleList(
            ResBlock(self.channels[max(level - 1, 0)], self.channels[level]) for level in range(depth)
        )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        h = self.stem(x)
        for level, block in enumerate(self.blocks):
            if level:
                h = F.max_pool2d(h, 2)
            h = block(h)
            feats.append(h)
        return feats


class UNetDecoder(nn.Module):
    """2×2 stride-2 transposed convolution up, optional concat of the encoder's lateral skip, ResBlock;
    a 1×1 head gives ``out_channels`` maps at input resolution.

    Transposed 2×2/stride-2 convolutions (rather than bilinear up-sampling) make every output pixel depend
    on exactly one coarse pixel, which keeps the receptive field easy to bound for tiled inference.
    """

    def __init__(self, out_channels: int = 2, width: int = 32, depth: int = 4, skips: bool = True):
        super().__init__()
        self.width, self.depth, self.skips = width, depth, skips
        ch = _channels(width, depth)
        # Index ``level`` goes from the coarsest decoded level (depth-2) to 0; ModuleLists are finest first.
        self.ups = nn.ModuleList(nn.ConvTranspose2d(ch[level + 1], ch[level], 2, stride=2)
                                 for level in range(depth - 1))
        self.blocks = nn.ModuleList(ResBlock(ch[level] * (2 if skips else 1), ch[level])
                                    for level in range(depth - 1))
        self.head = nn.Conv2d(ch[0], out_channels, 1)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        h = feats[-1]
        for level in range(self.depth - 2, -1, -1):
            h = self.ups[level](h)
            if self.skips:
                h = torch.cat([feats[level], h], dim=1)
            h = self.blocks[level](h)
        return self.head(h)


def _check_input(x: torch.Tensor, in_channels: int, depth: int) -> None:
    if x.dim() != 4 or x.shape[1] != in_channels:
        raise ValueError(f"expected a (B, {in_channels}, H, W) tensor, got shape {tuple(x.shape)}")
    mult = 2 ** (depth - 1)
    if x.shape[-2] % mult or x.shape[-1] % mult:
        raise ValueError(
            f"H and W must be multiples of 2**(depth-1) = {mult} (got {x.shape[-2]}×{x.shape[-1]}); "
            f"pad or crop the input to a multiple of {mult}"
        )


def receptive_radius(depth: int) -> int:
    """Tight bound, in input pixels, on how far an output pixel's inputs can lie from it (per side).

    Derivation, tracking how far a feature's dependencies extend outside the block of input pixels it
    covers (a level-l pixel covers a ``2**l`` block):

    * the stem 3×3 conv: 1;
    * each 3×3 (depthwise) conv at level l: ``2**l`` (:attr:`ResBlock.N_CONV3` of them per block,
      one block per encoder level and one per decoder level below the bottom);
    * a 2×2/stride-2 max-pool: 0 (the parent block is exactly the union of its children's blocks);
    * a 2×2/stride-2 transposed conv from level l+1 to l: ``2**l`` on one side (the child's block sits in
      either half of its parent's block), so the worst pixel position gets it on the side it looks at;
    * the 1×1 head and the lateral skips (a shorter path): 0.

    depth=4 → 1 + 2·(1+2+4+8) + 2·(1+2+4) + (1+2+4) = 52 (reached: see the tests).
    """
    enc = 1 + sum(ResBlock.N_CONV3 * 2**level for level in range(depth))
    dec = sum((1 + ResBlock.N_CONV3) * 2**level for level in range(depth - 1))
    return enc + dec


def receptive_margin(net: nn.Module | int) -> int:
    """Pixels of context to add on every side of a tile so tiled inference equals whole-image inference.

    Tiles (and their margins) must start on the grid of ``g = 2**(depth-1)`` pixels, or the max-pools would
    group pixels differently than on the whole image. On that grid, the transposed-conv part of
    :func:`receptive_radius` (``g − 1`` in all) only reaches back to the start of the pixel's own g-block,
    which lies inside the tile, so the margin is ``receptive_radius − (g − 1)`` rounded up to a multiple
    of g: depth 4 → 52 − 7 = 45 → **48** px (a 1024 px tile is read as 1120 px);
    depth 3 → 24. The tests show it is exact: one grid step less and seams appear. Holds in eval mode
    (batch norm in train mode mixes statistics over the whole batch). Accepts a net or a depth.
    """
    depth = net if isinstance(net, int) else net.depth
    g = 2 ** (depth - 1)
    need = receptive_radius(depth) - (g - 1)
    return -(-need // g) * g


class _EncoderNet(nn.Module):
    """What every net here shares: its geometry and the encoder (state-dict names ``encoder.*``)."""

    def __init__(self, in_channels: int, n_classes: int, width: int, depth: int, skips: bool):
        super().__init__()
        self.in_channels, self.n_classes = in_channels, n_classes
        self.width, self.depth, self.skips = width, depth, skips
        self.encoder = UNetEncoder(in_channels, width, depth)

    @property
    def margin(self) -> int:
        """See :func:`receptive_margin`."""
        return receptive_margin(self.depth)


class SegUNet(_EncoderNet):
    """U-Net with separable convs, residual blocks and batch norm (Pinchaud 2024, section 4).

    ``(B, in_channels, H, W)`` → per-pixel logits ``(B, n_classes, H, W)``, H and W multiples of
    ``2**(depth-1)``. ``skips=False`` drops the lateral skip connections: the paper's auto-encoder, whose
    only path through the bottleneck forces the encoder to learn a compressed description of the tissue.
    """

    def __init__(self, in_channels: int = 3, n_classes: int = 2, width: int = 32, depth: int = 4,
                 skips: bool = True):
        super().__init__(in_channels, n_classes, width, depth, skips)
        self.decoder = UNetDecoder(n_classes, width, depth, skips)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(x, self.in_channels, self.depth)
        return self.decoder(self.encoder(x))


class DualDecoderNet(_EncoderNet):
    """ConfKD's dual-branch net: shared :class:`UNetEncoder`, teacher and student :class:`UNetDecoder`.

    Sharing the encoder is what lets the weakly supervised student benefit from the features the strongly
    supervised teacher shapes; two decoders let each branch fit its own kind of label. Forward returns
    ``(teacher_logits, student_logits)``, both ``(B, n_classes, H, W)``.
    """

    def __init__(self, in_channels: int = 3, n_classes: int = 2, width: int = 32, depth: int = 4,
                 skips: bool = True):
        super().__init__(in_channels, n_classes, width, depth, skips)
        self.teacher = UNetDecoder(n_classes, width, depth, skips)
        self.student = UNetDecoder(n_classes, width, depth, skips)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        _check_input(x, self.in_channels, self.depth)
        feats = self.encoder(x)
        return self.teacher(feats), self.student(feats)


class BranchNet(nn.Module):
    """One decoder of a :class:`DualDecoderNet` on its shared encoder, as a plain one-output net.

    Maps need only one decoder's output; running both would spend a decoder's worth of compute for nothing.
    Shares (does not copy) the parent's modules.
    """

    def __init__(self, net: DualDecoderNet, which: str = "student"):
        super().__init__()
        if which not in ("teacher", "student"):
            raise ValueError(f"which decoder: 'teacher' or 'student', not {which!r}")
        self.in_channels, self.n_classes, self.depth = net.in_channels, net.n_classes, net.depth
        self.encoder = net.encoder
        self.decoder = getattr(net, which)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(x, self.in_channels, self.depth)
        return self.decoder(self.encoder(x))


def build_net(cfg: Any, dual: bool = False) -> nn.Module:
    """The net of a segmentation config (a :class:`~.configs.SegConfig`: its ``width`` and ``depth``): a
    :class:`SegUNet`, or with ``dual`` a :class:`DualDecoderNet` (ConfKD). Here, below both, because training
    (:mod:`.methods`) builds it and so does loading a finished run (:mod:`.predict`)."""
    net = (DualDecoderNet if dual else SegUNet)(in_channels=3, n_classes=2, width=cfg.width, depth=cfg.depth)
    # channels-last: depthwise convolutions run about twice as fast on CPU in this layout
    return net.to(memory_format=torch.channels_last)


def _fold_into(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    scale = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight
    shift = -bn.running_mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias
    if conv.bias is not None:
        shift = shift + conv.bias * scale
    conv.weight = nn.Parameter(conv.weight.detach() * scale.detach().view(-1, 1, 1, 1))
    conv.bias = nn.Parameter(shift.detach())


def fold_batch_norm(net: nn.Module) -> nn.Module:
    """A copy of an eval-mode ``net`` with every batch norm that follows a convolution folded into it.

    In eval mode batch norm is a per-channel affine map, so it can live in the preceding convolution's
    weights and bias: the output is the same (to float rounding) and the mapping pass no longer spends
    about a sixth of its time on a separate memory-bound pass over every activation. ``net`` itself is not
    touched (the trainer goes on training it). Batch norms not directly after a convolution stay as they are.
    """
    if net.training:
        raise ValueError("fold batch norm only into a net in eval mode: in training mode it uses batch statistics")
    fused = copy.deepcopy(net)
    for module in list(fused.modules()):
        if not isinstance(module, nn.Sequential):
            continue
        names = list(module._modules)
        for prev, name in pairwise(names):
            bn, conv = module._modules[name], module._modules[prev]
            if isinstance(conv, SepConv2d):
                conv = conv[-1]
            if (isinstance(bn, nn.BatchNorm2d) and bn.track_running_stats and isinstance(conv, nn.Conv2d)
                    and conv.out_channels == bn.num_features):
                _fold_into(conv, bn)
                module._modules[name] = nn.Identity()
    return fused


def autoencoder_pretrain_net(width: int = 32, depth: int = 4, in_channels: int = 3) -> SegUNet:
    """The paper's pre-training net: the same architecture without lateral skips, with an
    ``in_channels``-map reconstruction head (linear output, trained with :func:`reconstruction_loss`)."""
    return SegUNet(in_channels=in_channels, n_classes=in_channels, width=width, depth=depth, skips=False)


def reconstruction_loss(reconstruction: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    """L2 (mean squared error) between the auto-encoder output and its input, as in the paper."""
    return F.mse_loss(reconstruction, image)


def transfer_encoder(source: nn.Module, target: nn.Module, include_decoder: bool = True) -> list[str]:
    """Copy pre-trained weights (parameters and batch-norm buffers) from ``source`` into ``target``.

    ``source`` is a :class:`SegUNet` (typically :func:`autoencoder_pretrain_net`); ``target`` a
    :class:`SegUNet` or a :class:`DualDecoderNet` (whose teacher and student decoders both receive the
    source decoder). Every encoder tensor is copied; decoder tensors only where name and shape match (the
    first conv of a skip-connected decoder block sees twice the channels, so it stays freshly initialised),
    and never the head, which predicts a different quantity. Returns the target names that were copied.
    """
    src = source.state_dict()
    dst = target.state_dict()
    copied: dict[str, torch.Tensor] = {}
    for name, tensor in dst.items():
        prefix, _, rest = name.partition(".")
        if prefix in ("teacher", "student"):
            src_name = "decoder." + rest
        else:
            src_name = name
        is_decoder = src_name.startswith("decoder.")
        if is_decoder and (not include_decoder or src_name.startswith("decoder.head.")):
            continue
        value = src.get(src_name)
        if value is not None and value.shape == tensor.shape:
            copied[name] = value
    missing_encoder = [n for n in dst if n.startswith("encoder.") and n not in copied]
    if missing_encoder:
        raise ValueError(
            f"source and target encoders differ (width/depth/in_channels?): {missing_encoder[:3]}")
    target.load_state_dict(copied, strict=False)
    return sorted(copied)
