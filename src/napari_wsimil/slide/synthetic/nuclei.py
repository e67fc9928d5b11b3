"""Nuclei of the procedural slides: sprite banks and populations on a global jittered grid of cells.

Why the global grid: each cell's nucleus (presence, position, shape) comes from a hash of the cell's global
index, so the tiles either side of a border draw the same nucleus and no seam appears.
"""

from __future__ import annotations

import numpy as np

from napari_wsimil.slide.synthetic.noise import splitmix
from napari_wsimil.slide.synthetic.params import TILE

TONED_SIZE = 0.62  # tumour nuclei at contrast 0: this linear size (about a normal nucleus's area) ...
TONED_DARK = 0.8  # ... and this share of their haematoxylin density


class NucleusPop:
    """One population of nuclei on a global jittered grid of square cells.

    A cell holds at most one nucleus; its window (sprite) fits in ``2 * radius + 1`` px and the cell
    is that wide, so nuclei of cells with the same (row, column) parity never share a pixel: drawing
    them in four parity passes with a gather-max-scatter is exact without ``np.maximum.at``. The model holds
    one per kind of nucleus (stromal, two tumour populations, lymphocytes of aggregates).
    """

    def __init__(self, kind: str, radius: int, bank: np.ndarray, pop: int, p_max: float, n_orient: int = 0):
        self.kind = kind
        self.p_max = p_max  # the highest chance that a cell holds a nucleus
        self.radius = radius
        self.win = 2 * radius + 1
        self.cell = self.win
        self.bank = bank.reshape(len(bank), -1)
        self.n_sprites = len(bank)
        self.pop = np.uint64(pop)
        self.n_orient = n_orient
        self.reach = 2 * radius + self.cell  # how far outside a tile a drawn pixel's cell may start

    @classmethod
    def normal(cls, rng: np.random.Generator, um: float, pop: int) -> NucleusPop:
        """Spindle fibroblast nuclei in 16 orientation bins (4 variants each), then 16 lymphocytes."""
        r = max(4, round(5 * um))
        sprites = []
        n_orient = 16
        for b in range(n_orient):
            for _ in range(4):
                ang = (b + rng.uniform(-0.5, 0.5)) * np.pi / n_orient
                sprites.append(_sprite(rng, r, rng.uniform(0.72, 0.85) * r, rng.uniform(1.0, 1.5) * um, ang,
                                       rng.uniform(0.55, 0.8), lobes=0.05, grain=0.15, rim=0.0, nucleoli=0))
        for _ in range(16):
            rad = rng.uniform(1.6, 2.1) * um
            sprites.append(_sprite(rng, r, rad, rad * rng.uniform(0.85, 1.0), rng.uniform(0, np.pi),
                                   rng.uniform(0.8, 0.95), lobes=0.04, grain=0.1, rim=0.0, nucleoli=0))
        return cls("normal", r, np.stack(sprites), pop, 0.28, n_orient)

    @classmethod
    def lymphocyte(cls, rng: np.random.Generator, um: float, pop: int) -> NucleusPop:
        """Small, round, dark lymphocyte nuclei on a tight grid (about 6 µm cells): packed aggregates."""
        r = max(3, round(2.5 * um))
        sprites = []
        for _ in range(16):
            rad = min(rng.uniform(1.7, 2.2) * um, r - 0.5)
            sprites.append(_sprite(rng, r, rad, rad * rng.uniform(0.85, 1.0), rng.uniform(0, np.pi),
                                   rng.uniform(0.85, 1.0), lobes=0.04, grain=0.1, rim=0.0, nucleoli=0))
        return cls("lymph", r, np.stack(sprites), pop, 0.85)

    @classmethod
    def tumour(cls, rng: np.random.Generator, um: float, pop: int) -> NucleusPop:
        """Large, pleomorphic, hyperchromatic or vesicular nuclei with nucleoli."""
        r = max(6, round(6 * um))
        sprites = []
        for _ in range(64):
            a = rng.uniform(0.5, 0.75) * r  # lobes reach at most 1.3 a < r
            sprites.append(_sprite(rng, r, a, a * rng.uniform(0.6, 1.0), rng.uniform(0, np.pi),
                                   rng.uniform(0.75, 1.0), lobes=0.1, grain=0.3, rim=0.35,
                                   nucleoli=int(rng.integers(0, 3))))
        return cls("tumour", r, np.stack(sprites), pop, 0.8)

    def toned_down(self, contrast: float) -> NucleusPop:
        """This population with its nuclei shrunk and paled towards normal ones as ``contrast`` falls
        from 1 to 0 (at 0: about the area and darkness of a normal nucleus). Same cells, same draws."""
        c = float(contrast)
        scale = TONED_SIZE + (1.0 - TONED_SIZE) * c  # linear size: 0.62^2 ~ normal area / tumour area
        dark = TONED_DARK + (1.0 - TONED_DARK) * c
        w, r = self.win, self.radius
        yy, xx = np.mgrid[0:w, 0:w].astype(np.float64)
        sy, sx = (yy - r) / scale + r, (xx - r) / scale + r  # where each output pixel reads the sprite
        y0, x0 = np.floor(sy).astype(np.intp), np.floor(sx).astype(np.intp)
        fy, fx = sy - y0, sx - x0
        sprites = self.bank.reshape(-1, w, w).astype(np.float64)
        padded = np.pad(sprites, ((0, 0), (1, 2), (1, 2)))  # zero outside: indices -1 ... w+1 allowed
        yi, xi = np.clip(y0, -1, w) + 1, np.clip(x0, -1, w) + 1

        def at(dy: int, dx: int) -> np.ndarray:
            return padded[:, yi + dy, xi + dx]

        out = ((1 - fy) * (1 - fx) * at(0, 0) + (1 - fy) * fx * at(0, 1)
               + fy * (1 - fx) * at(1, 0) + fy * fx * at(1, 1))
        bank = np.clip(np.rint(out * dark), 0, 255).astype(np.uint8)
        return NucleusPop(self.kind, self.radius, bank, int(self.pop), self.p_max, self.n_orient)

    def candidates(self, key: np.uint64, y0: int, x0: int):
        """Cells whose nucleus could touch the tile at (y0, x0): indices, centres, 4 uniforms each."""
        c, r = self.cell, self.radius
        gy = np.arange((y0 - r) // c, (y0 + TILE - 1 + r) // c + 1, dtype=np.int64)
        gx = np.arange((x0 - r) // c, (x0 + TILE - 1 + r) // c + 1, dtype=np.int64)
        gy, gx = np.meshgrid(gy, gx, indexing="ij")
        gy, gx = gy.ravel(), gx.ravel()
        with np.errstate(over="ignore"):
            h = splitmix(key ^ splitmix(gy.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
                                          + gx.astype(np.uint64) * np.uint64(0xD1B54A32D192ED03)
                                          + self.pop))
            u = np.empty((len(h), 4))
            for j in range(4):
                h = splitmix(h + np.uint64(0x632BE59BD9B4E019))
                u[:, j] = (h >> np.uint64(11)).astype(np.float64) * (1.0 / 2**53)
        cy = gy * c + (u[:, 1] * c).astype(np.int64)
        cx = gx * c + (u[:, 2] * c).astype(np.int64)
        return gy, gx, cy, cx, u

    def choose(self, u: np.ndarray, w_a: np.ndarray, ang_a: float, ang_b: float) -> np.ndarray:
        """Spindle nuclei follow the local fibre direction; one in five is a round lymphocyte."""
        frac = (u[:, 3] * 5.0) % 1.0  # a second uniform from the same draw
        ang = np.where(frac < w_a, ang_a, ang_b) % np.pi
        b = (np.rint(ang / np.pi * self.n_orient).astype(np.intp) % self.n_orient)
        variant = (u[:, 3] * 4 * 5).astype(np.intp) % 4
        spindle = b * 4 + variant
        lymph = self.n_orient * 4 + (u[:, 3] * 16 * 25).astype(np.intp) % 16
        return np.where(u[:, 3] < 0.2, lymph, spindle)

    def draw(self, canvas: np.ndarray, stride: int, oy: int, ox: int, gy: np.ndarray, gx: np.ndarray,
             cy: np.ndarray, cx: np.ndarray, sprite: np.ndarray) -> None:
        w, r = self.win, self.radius
        offs = (np.arange(w)[:, None] * stride + np.arange(w)[None, :]).ravel()
        base = (cy - r - oy) * stride + (cx - r - ox)
        parity = (gy & 1) * 2 + (gx & 1)
        for p in range(4):
            sel = parity == p
            if not sel.any():
                continue
            idx = base[sel][:, None] + offs[None, :]
            canvas[idx] = np.maximum(canvas[idx], self.bank[sprite[sel]])


def _sprite(rng: np.random.Generator, r: int, a: float, b: float, angle: float, dark: float, *,
            lobes: float, grain: float, rim: float, nucleoli: int) -> np.ndarray:
    """One nucleus as haematoxylin density (uint8) in a (2r+1)^2 window: an irregular ellipse with
    chromatin texture, an optional darker rim (vesicular nuclei) and nucleoli, slightly blurred."""
    n = 2 * r + 1
    yy, xx = np.mgrid[0:n, 0:n] - float(r)
    u = xx * np.cos(angle) + yy * np.sin(angle)
    v = -xx * np.sin(angle) + yy * np.cos(angle)
    phi = np.arctan2(v, u)
    wobble = 1.0 + sum(rng.uniform(0, lobes) * np.cos(k * phi + rng.uniform(0, 2 * np.pi)) for k in (2, 3, 5))
    q = np.sqrt((u / a) ** 2 + (v / b) ** 2) / wobble
    inside = np.clip((1.0 - q) * min(a, b) + 0.5, 0.0, 1.0)
    tex = 1.0 - grain + grain * rng.uniform(0.0, 1.0, (n, n))
    d = inside * tex * (1.0 - rim + rim * np.clip((q - 0.55) / 0.35, 0.0, 1.0))
    for _ in range(nucleoli):
        ny, nx = rng.uniform(-0.4, 0.4, 2) * min(a, b)
        d = np.maximum(d, np.clip(1.6 - np.hypot(yy - ny, xx - nx), 0.0, 1.0) * inside)
    d = np.pad(d, 1)
    d = 0.25 * d[:-2] + 0.5 * d[1:-1] + 0.25 * d[2:]  # [1 2 1]/4 blur: a scan is never razor-sharp
    d = 0.25 * d[:, :-2] + 0.5 * d[:, 1:-1] + 0.25 * d[:, 2:]
    d[[0, -1], :] = 0
    d[:, [0, -1]] = 0
    return np.clip(np.rint(d * dark * 255), 0, 255).astype(np.uint8)
