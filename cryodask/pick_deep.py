"""Component 2b — DeepCryoPicker-style picking with a network trained on automatic labels.

No human labels anywhere: the IBC picker (:mod:`cryodask.pick`) labels the training data.

1. :func:`extract_training_patches` (per micrograph — a map step): the preprocessed
   micrograph, rescaled so the particle is :data:`NET_DIAMETER_PX` wide, is cut into tiles
   whose every pixel is labelled as the patch (33² px, the network's receptive field) centred
   on it: *positive* (1 = top, 2 = side) at confident IBC picks, *negative* (0) on
   background, contamination, poor IBC candidates and off-centre positions, *ignored* around
   uncertain candidates. A tile is thus thousands of labelled patches at once.
2. :func:`train_picker` (the reduction): the tiles of all micrographs are concatenated and a
   small fully-convolutional network (:class:`PickerNet`, dilated convolutions) is trained
   with the 8 dihedral symmetries as augmentation. Seeded and deterministic on CPU; CUDA when
   present.
3. :func:`pick_deep` (per micrograph): the network slides over the whole micrograph in one
   fully-convolutional pass per dihedral symmetry (averaged), giving a per-pixel particle
   probability; peaks are kept greedily with a minimum distance of 0.6 diameter and a
   probability ≥ ``threshold``, and refined to sub-pixel. Coordinates are pixels of the
   original micrograph.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
import pandas as pd
import torch
from torch import nn

from .pick import PICK_COLUMNS, _empty_picks, _scales, nms_peaks, pick_ibc, to_original
from .preprocess import TARGET_DIAMETER_PX, picking_binning
from .projection import default_device

__all__ = [
    "NET_DIAMETER_PX",
    "PickerNet",
    "extract_training_patches",
    "train_picker",
    "score_map",
    "pick_deep",
    "save_model",
    "load_model",
    "CLASSES",
]

#: Particle diameter in pixels at the network's scale.
NET_DIAMETER_PX = 24.0

#: Output classes of the network, in order.
CLASSES = ("background", "top", "side")


class PickerNet(nn.Module):
    """Fully-convolutional 3-class (background / top / side) particle classifier.

    Four valid convolutions (5×5, then 3×3 with dilations 2, 4, 8) give a receptive field of
    ``patch_size`` = 33 px ≈ 1.4 particle diameters at the net scale: a 33² patch maps to
    one output pixel, a whole image (zero-padded by 16 px, i.e. with the mean of the
    normalised image) to a dense map of the same size.
    Input: one-channel image normalised to mean 0, std 1. Output: logits ``(n, 3, h, w)``.
    """

    patch_size = 33

    def __init__(self, width: int = 8):
        super().__init__()
        w = width
        self.body = nn.Sequential(
            nn.Conv2d(1, w, 5), nn.ReLU(inplace=True),
            nn.Conv2d(w, w, 3, dilation=2), nn.ReLU(inplace=True),
            nn.Conv2d(w, 2 * w, 3, dilation=4), nn.ReLU(inplace=True),
            nn.Conv2d(2 * w, 2 * w, 3, dilation=8), nn.ReLU(inplace=True),
            nn.Conv2d(2 * w, 3, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def _net_scale(img_shape, pixel_size, diameter, binning, original_shape):
    """(scale factor from the preprocessed image to the net image, diameter px in preprocessed)."""
    if binning is None:
        binning = picking_binning(pixel_size, diameter, TARGET_DIAMETER_PX)
    sy, sx = _scales(img_shape, binning, original_shape)
    d_pre = float(diameter) / float(pixel_size) / float(np.sqrt(sy * sx))
    return min(1.0, NET_DIAMETER_PX / d_pre), d_pre, (sy, sx)


def _to_net(img: np.ndarray, f: float) -> np.ndarray:
    img = np.asarray(img, np.float32)
    if f < 1.0:
        ny, nx = max(1, int(round(img.shape[0] * f))), max(1, int(round(img.shape[1] * f)))
        img = cv2.resize(img, (nx, ny), interpolation=cv2.INTER_AREA)
    s = float(img.std()) or 1.0
    return ((img - float(img.mean())) / s).astype(np.float32)


def _label_map(shape, picks, f, d, positive_threshold, negative_threshold):
    """Per-pixel labels at the net scale: 1/2 (top/side) within 0.12·d of a confident IBC
    pick, −1 (ignored) from there to 0.3·d and within 0.5·d of uncertain candidates, 0
    (background) elsewhere."""
    ny, nx = shape
    lab = np.zeros((ny, nx), np.int64)
    if picks is None or len(picks) == 0:
        return lab
    rows = picks["row"].to_numpy(float) * f
    cols = picks["col"].to_numpy(float) * f
    score = picks["score"].to_numpy(float)
    acc = picks["accepted"].to_numpy(bool)
    cont = picks["contaminated"].to_numpy(bool)
    pos = acc & (score >= positive_threshold)
    hard = (score < negative_threshold) | cont
    if "empty" in picks.columns:  # rejected by the IBC picker's edge-strength tests: background
        hard |= picks["empty"].to_numpy(bool) & ~acc
    if "relative_strength" in picks.columns:
        hard |= ~acc & (picks["relative_strength"].to_numpy(float) < 0.25)
    unsure = ~pos & ~hard
    cls = np.where(picks["view"].to_numpy() == "side", 2, 1)

    def paint(r, c, radius, value):
        rad = int(np.ceil(radius))
        yy, xx = np.mgrid[-rad:rad + 1, -rad:rad + 1]
        for y0, x0, v in zip(r, c, np.broadcast_to(value, r.shape)):
            iy, ix = int(round(y0)), int(round(x0))
            ys, xs = yy + iy, xx + ix
            ok = ((ys - y0) ** 2 + (xs - x0) ** 2 <= radius ** 2) & (ys >= 0) & (ys < ny) & (xs >= 0) & (xs < nx)
            lab[ys[ok], xs[ok]] = v

    paint(rows[unsure], cols[unsure], 0.5 * d, -1)
    paint(rows[pos], cols[pos], 0.3 * d, -1)
    paint(rows[pos], cols[pos], max(1.0, 0.12 * d), cls[pos])
    return lab


def extract_training_patches(
    pre_img: np.ndarray,
    picks: pd.DataFrame | None,
    pixel_size: float,
    diameter: float,
    *,
    binning: float | None = None,
    original_shape: Sequence[int] | None = None,
    tile: int = 64,
    positive_threshold: float = 0.5,
    negative_threshold: float = 0.35,
) -> tuple[np.ndarray, np.ndarray]:
    """Training tiles of one preprocessed micrograph, labelled per pixel by the IBC picker.

    The micrograph is rescaled so the particle is :data:`NET_DIAMETER_PX` wide, normalised
    (mean 0, std 1) and cut into ``tile``² tiles. Every output pixel of a tile stands for the
    :class:`PickerNet` patch (33² px) centred on it, so a tile is ``tile²`` labelled patches:
    *positive* (1 = top, 2 = side) within 0.12·diameter of an accepted IBC pick with score
    ≥ ``positive_threshold``; *negative* (0) everywhere else — background, contamination, poor
    candidates (score < ``negative_threshold``, or rejected for weak edges or an empty
    micrograph) and off-centre positions; *ignored* (−1) on the
    ring 0.12–0.3·diameter around positives (localisation tolerance) and within 0.5·diameter
    of uncertain candidates (score between the two thresholds, or accepted but below
    ``positive_threshold``).

    ``picks``: IBC candidates of this micrograph, ``pick_ibc(..., return_candidates=True)``
    (recomputed when ``None``).

    Returns ``(patches, labels)``: float32 ``(n, tile + 32, tile + 32)`` input tiles and int64
    ``(n, tile, tile)`` label maps.
    """
    if picks is None or "accepted" not in getattr(picks, "columns", []):
        picks = pick_ibc(pre_img, pixel_size, diameter, binning=binning, original_shape=original_shape,
                         return_candidates=True)
    f, d_pre, _ = _net_scale(np.shape(pre_img), pixel_size, diameter, binning, original_shape)
    net = _to_net(pre_img, f)
    d = d_pre * f
    lab = _label_map(net.shape, picks, f, d, positive_threshold, negative_threshold)
    h = PickerNet.patch_size // 2
    ny, nx = net.shape
    ty, tx = -(-ny // tile), -(-nx // tile)
    big = np.pad(net, ((h, h + ty * tile - ny), (h, h + tx * tile - nx)), mode="constant")
    lab = np.pad(lab, ((0, ty * tile - ny), (0, tx * tile - nx)), constant_values=-1)
    xs, ys = [], []
    for i in range(ty):
        for j in range(tx):
            xs.append(big[i * tile:i * tile + tile + 2 * h, j * tile:j * tile + tile + 2 * h])
            ys.append(lab[i * tile:(i + 1) * tile, j * tile:(j + 1) * tile])
    return np.stack(xs).astype(np.float32), np.stack(ys).astype(np.int64)


def _dihedral(x: torch.Tensor, k: int) -> torch.Tensor:
    if k >= 4:
        x = torch.flip(x, dims=(-1,))
    return torch.rot90(x, k % 4, dims=(-2, -1))


def train_picker(
    patches: np.ndarray,
    labels: np.ndarray,
    *,
    seed: int = 0,
    device: str | torch.device | None = None,
    epochs: int = 30,
    batch_size: int = 8,
    lr: float = 2e-3,
    width: int = 8,
    min_steps: int = 900,
) -> PickerNet:
    """Train :class:`PickerNet` on labelled tiles from :func:`extract_training_patches`.

    Per-pixel cross-entropy (label −1 ignored) with inverse-frequency class weights (capped at
    20), Adam with a cosine learning-rate decay, one random dihedral symmetry per batch.
    ``epochs`` passes over the tiles, but at least ``min_steps`` optimiser steps (small
    training sets get more passes). Deterministic for a given ``seed`` on CPU. Returns the
    network in eval mode, on CPU.
    """
    dev = torch.device(device) if device is not None else default_device()
    g = torch.Generator().manual_seed(int(seed))
    torch.manual_seed(int(seed))
    x = torch.as_tensor(np.asarray(patches, np.float32))[:, None]
    y = torch.as_tensor(np.asarray(labels, np.int64))
    if len(y) == 0:
        raise ValueError("no training patches")
    model = PickerNet(width).to(dev).to(memory_format=torch.channels_last)
    counts = torch.bincount(y[y >= 0].ravel(), minlength=3).float()
    w = torch.where(counts > 0, (counts.sum() / (3 * counts.clamp(min=1))), torch.zeros_like(counts))
    w = (w / w[0].clamp(min=1e-12)).clamp(max=20.0) if counts[0] > 0 else w
    lossf = nn.CrossEntropyLoss(weight=w.to(dev), ignore_index=-1)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    n_batches = (len(y) + batch_size - 1) // batch_size
    epochs = max(int(epochs), -(-int(min_steps) // max(n_batches, 1)))
    steps = max(1, epochs * n_batches)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=g)
        for i in range(0, len(y), batch_size):
            idx = perm[i:i + batch_size]
            k = int(torch.randint(0, 8, (1,), generator=g))
            xb = _dihedral(x[idx], k).contiguous(memory_format=torch.channels_last).to(dev)
            yb = _dihedral(y[idx], k).to(dev)
            opt.zero_grad()
            loss = lossf(model(xb), yb)
            loss.backward()
            opt.step()
            sched.step()
    return model.eval().cpu().to(memory_format=torch.contiguous_format)


@torch.no_grad()
def score_map(model: PickerNet, net_img: np.ndarray, device: str | torch.device | None = None,
              symmetrise: bool = True) -> np.ndarray:
    """Per-pixel class probabilities ``(3, ny, nx)`` of a net-scale image (one FCN pass, or
    the mean over the 8 dihedral symmetries of the image when ``symmetrise``)."""
    dev = torch.device(device) if device is not None else default_device()
    h = PickerNet.patch_size // 2
    pad = torch.as_tensor(np.pad(np.asarray(net_img, np.float32), h, mode="constant"))[None, None].to(dev)
    model = model.to(dev).eval()
    out = None
    for k in range(8 if symmetrise else 1):
        p = torch.softmax(model(_dihedral(pad, k)), 1)
        # undo the symmetry: inverse of rot90^k∘flip is flip∘rot90^-k
        p = torch.rot90(p, -(k % 4), dims=(-2, -1))
        if k >= 4:
            p = torch.flip(p, dims=(-1,))
        out = p if out is None else out + p
    return (out[0] / (8 if symmetrise else 1)).cpu().numpy()


def pick_deep(
    model: PickerNet,
    pre_img: np.ndarray,
    pixel_size: float,
    diameter: float,
    *,
    binning: float | None = None,
    original_shape: Sequence[int] | None = None,
    threshold: float = 0.7,
    min_distance: float = 0.6,
    border: float = 0.05,
    device: str | torch.device | None = None,
    ibc_candidates: pd.DataFrame | None = None,
    check_empty: bool = True,
) -> pd.DataFrame:
    """Pick one preprocessed micrograph with a trained :class:`PickerNet`.

    Score = 1 − P(background) at the peak; view = the more probable of top/side. Peaks closer
    than ``min_distance``·diameter are suppressed, picks below ``threshold`` or closer than
    ``border``·diameter to the edge dropped. With ``check_empty`` a micrograph that the IBC
    picker's edge-strength gate finds empty (no particle-like object at all) gets no picks;
    pass its ``pick_ibc(..., return_candidates=True)`` table as ``ibc_candidates`` to reuse it,
    otherwise the gate is recomputed. Returns a DataFrame :data:`PICK_COLUMNS` in
    original-micrograph pixels, sorted by decreasing score.
    """
    if check_empty:
        if ibc_candidates is None or "empty" not in ibc_candidates.columns:
            ibc_candidates = pick_ibc(pre_img, pixel_size, diameter, binning=binning, original_shape=original_shape,
                                      side_views=False, return_candidates=True)
        if len(ibc_candidates) == 0 or bool(ibc_candidates["empty"].iloc[0]):
            return _empty_picks()
    f, d_pre, (sy, sx) = _net_scale(np.shape(pre_img), pixel_size, diameter, binning, original_shape)
    net = _to_net(pre_img, f)
    prob = score_map(model, net, device)
    s = 1.0 - prob[0]
    d = d_pre * f
    pk = nms_peaks(s, min_distance * d, threshold)
    if len(pk) == 0:
        return _empty_picks()
    ny, nx = s.shape
    bd = np.minimum.reduce([pk[:, 0], pk[:, 1], ny - 1 - pk[:, 0], nx - 1 - pk[:, 1]]) / d
    pk = pk[bd >= border]
    if len(pk) == 0:
        return _empty_picks()
    # sub-pixel peak (parabola through the 3 neighbours on each axis)
    r, c = pk[:, 0].astype(float), pk[:, 1].astype(float)
    sp = np.pad(s, 1, mode="edge")
    i, j = pk[:, 0] + 1, pk[:, 1] + 1
    for axis, (a, b) in enumerate(((sp[i - 1, j], sp[i + 1, j]), (sp[i, j - 1], sp[i, j + 1]))):
        den = a - 2 * sp[i, j] + b
        off = np.where(den < 0, 0.5 * (a - b) / np.where(den < 0, den, -1), 0.0)
        if axis == 0:
            r += np.clip(off, -0.5, 0.5)
        else:
            c += np.clip(off, -0.5, 0.5)
    # net pixel -> preprocessed pixel -> original pixel
    fy, fx = np.shape(pre_img)[0] / ny, np.shape(pre_img)[1] / nx
    rp, cp = (r + 0.5) * fy - 0.5, (c + 0.5) * fx - 0.5
    x, y = to_original(rp, cp, sy, sx)
    view = np.where(prob[2][pk[:, 0], pk[:, 1]] > prob[1][pk[:, 0], pk[:, 1]], "side", "top").astype(object)
    df = pd.DataFrame({"x": x, "y": y, "score": s[pk[:, 0], pk[:, 1]].astype(float), "view": view})
    return df.sort_values("score", ascending=False, kind="stable").reset_index(drop=True)[PICK_COLUMNS]


def _train_from_pieces(pieces, params):
    """Reduction used by :func:`cryodask.pick.pick_graph`: concatenate per-micrograph tiles
    (at most ``max_tiles``, default 2000, a seeded random subset) and train."""
    params = dict(params or {})
    xs = [p[0] for p in pieces if len(p[1])]
    ys = [p[1] for p in pieces if len(p[1])]
    n = sum(len(y) for y in ys)
    cap = int(params.get("max_tiles", 2000))
    if n > cap:
        keep = np.sort(np.random.default_rng(int(params.get("seed", 0))).choice(n, cap, replace=False))
        x_all, y_all = np.concatenate(xs), np.concatenate(ys)
        xs, ys = [x_all[keep]], [y_all[keep]]
    x = np.concatenate(xs) if xs else np.zeros((0, PickerNet.patch_size, PickerNet.patch_size), np.float32)
    y = np.concatenate(ys) if ys else np.zeros(0, np.int64)
    keys = ("seed", "device", "epochs", "batch_size", "lr", "width", "min_steps")
    kw = {k: v for k, v in params.items() if k in keys}
    return train_picker(x, y, **kw)


def save_model(model: PickerNet, path: str | Path | None = None) -> bytes:
    """Serialise the network's ``state_dict`` (and width); write it to ``path`` when given."""
    buf = io.BytesIO()
    width = model.body[0].out_channels
    torch.save({"state_dict": model.state_dict(), "width": width, "net_diameter_px": NET_DIAMETER_PX}, buf)
    data = buf.getvalue()
    if path is not None:
        Path(path).write_bytes(data)
    return data


def load_model(src: str | Path | bytes) -> PickerNet:
    """Load a network saved by :func:`save_model` (path or bytes), on CPU, eval mode."""
    data = src if isinstance(src, (bytes, bytearray)) else Path(src).read_bytes()
    obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    model = PickerNet(int(obj["width"]))
    model.load_state_dict(obj["state_dict"])
    return model.eval()
