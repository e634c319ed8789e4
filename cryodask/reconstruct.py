"""3D reconstruction by direct Fourier inversion, with CTF, symmetry and gold-standard halves.

Method (the RELION way, batched in torch):

1. **Accumulate.** Each particle image is Fourier transformed, shifted by its origin so that the
   particle sits at the box centre, multiplied by its CTF, and inserted as a central slice at its
   orientation ``A`` (and at ``A·g`` for every element ``g`` of the point group) into a ×``pad``
   oversampled 3D grid by trilinear interpolation; the weights ``CTF²`` go into a second grid the
   same way. Only the half ``k_x ≥ 0`` of the transform is stored (real maps are Hermitian).
   :func:`accumulate` returns these partial sums for a chunk of particles; :func:`combine` adds two
   of them. Addition is associative, so a Dask tree reduction over chunks is exact.
2. **Invert.** :func:`finalize` divides data by weights voxel by voxel (plain inversion, with a
   weight floor against division by CTF zeros; or RELION's MAP form that adds ``1/τ²`` per shell
   to the weights), then inverse FFT, crop to the box, divide by the trilinear gridding
   correction (sinc²) and flatten the corners beyond the inscribed sphere, as RELION does.
3. **Gold standard.** Particles are split into two random halves (``rlnRandomSubset`` 1/2; kept
   when the STAR file has them) that are accumulated separately and never mix. Their FSC gives
   the reported resolution (FSC = 0.143) and the per-shell SSNR (``FSC/(1−FSC)``; twice that for
   all particles) of the Wiener filter ``SSNR/(1+SSNR)`` applied to the combined map
   (:func:`gold_standard`).

Measured on a simulated ribosome stack (benchmarks/bench_reconstruct.py): with the same data and
poses the FSC against the truth equals ``relion_reconstruct``'s (plain and MAP inversions are at
the same information limit; a per-shell filter cannot change a per-shell FSC); a soft particle
mask (``mask_diameter``) is what improves it further.

Units: pixel sizes in Å, origins in px (RELION sign: shift by +origin to centre), defocus in Å,
angles in degrees, voltage kV, Cs mm. Maps (z, y, x) with the centre at N//2.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .projection import (
    _inside,
    _scatter_planar,
    _trilinear_planar,
    default_device,
    view_order,
    gridding_correction,
    half_grid_shape,
    hermitian_close,
)

__all__ = [
    "FourierAccumulator",
    "empty_accumulator",
    "accumulate",
    "combine",
    "finalize",
    "mask_outside_sphere",
    "smooth_fsc",
    "wiener_filter",
    "Reconstruction",
    "shell_mean_weight",
    "ssnr_from_fsc",
    "random_subsets",
    "gold_standard",
    "reconstruct_graph",
    "reconstruct_star",
]


# ------------------------------------------------------------------------------------ kernels


@dataclass(frozen=True)
class FourierAccumulator:
    """Partial Fourier sums of a set of particles.

    ``sums``: float32 (M+2, M+2, M//2+2, 3), M = pad·box, indexed (z, y, x, channel) on the half
    grid k_x ≥ 0 (z, y = k + M//2, x = k_x); channels Σ CTF·Re F, Σ CTF·Im F, Σ CTF², each
    spread by trilinear weights. ``count``: number of particle insertions (× symmetry order).
    """

    sums: torch.Tensor
    box: int
    pad: int = 2
    count: int = 0

    @property
    def m(self) -> int:
        return self.box * self.pad

    def closed(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(data complex64, weight float32), each (M, M, M//2+1), plane k_x = 0 completed."""
        c = hermitian_close(self.sums)
        return torch.complex(c[..., 0], c[..., 1]), c[..., 2]


def empty_accumulator(box: int, pad: int = 2, device=None) -> FourierAccumulator:
    """Zero sums for particles of ``box`` px."""
    device = device or default_device()
    return FourierAccumulator(torch.zeros(half_grid_shape(pad * box, 3), dtype=torch.float32, device=device),
                              box, pad, 0)


def combine(a: FourierAccumulator, b: FourierAccumulator) -> FourierAccumulator:
    """Sum of two partial accumulations (associative and commutative: exact under any tree)."""
    if (a.box, a.pad) != (b.box, b.pad):
        raise ValueError(f"cannot combine accumulators of box/pad {a.box}/{a.pad} and {b.box}/{b.pad}")
    sb = b.sums.to(a.sums.device)
    return FourierAccumulator(a.sums + sb, a.box, a.pad, a.count + b.count)


def _symmetry_ops(symmetry) -> np.ndarray:
    if symmetry is None:
        return np.eye(3)[None]
    if isinstance(symmetry, str):
        from .geometry import symmetry_matrices

        return symmetry_matrices(symmetry)
    return np.asarray(symmetry, dtype=np.float64).reshape(-1, 3, 3)


_PREP = 100_000  # samples whose coordinates are computed together (CPU)
_SCATTER = 25_000  # samples scattered together: their planes stay in cache over the 8 corner passes


def accumulate(
    images,
    rotations,
    origins_px=None,
    defocus=None,
    *,
    pixel_size: float = 1.0,
    optics=None,
    phase_shift=None,
    bfactor=None,
    ctf_scale=None,
    symmetry="C1",
    pad: int = 2,
    device=None,
    batch: int = 256,
    select=None,
    into: FourierAccumulator | None = None,
) -> FourierAccumulator:
    """Back-project a chunk of particles: partial Fourier sums (a pure function of its inputs).

    Parameters
    ----------
    images : (b, N, N) real, particle images (protein white), centre at N//2.
    rotations : (b, 3, 3) RELION rotation matrices (:func:`cryodask.geometry.euler_to_matrix`).
    origins_px : (b, 2) RELION origins (x, y) in px; images are shifted by +origin. None: 0.
    defocus : (b, 3) defocus U, V (Å) and astigmatism angle (degrees); None: no CTF (weights 1).
    pixel_size : Å/px.
    optics : object with ``voltage`` (kV), ``cs`` (mm), ``amplitude_contrast`` (e.g.
        :class:`cryodask.simulate.Optics`); needed with ``defocus``.
    phase_shift, bfactor, ctf_scale : (b,) or scalar, degrees / Å² / unitless; optional. Without
        ``defocus``, ``ctf_scale`` still weights each particle (data × s, weights × s²).
    symmetry : point-group symbol (``C1``, ``C4``, ``D7``, ``T``, ``O``, ``I``) or matrices
        (g, 3, 3); each image is inserted at ``A·g`` for every ``g``.
    pad : oversampling of the 3D grid (M = pad·N).
    select : optional indices of the particles to use (into ``images`` and every per-particle
        argument); saves copying a subset of a large block.
    into : optional accumulator to add to **in place** (it is returned, with its count updated);
        for graphs that thread one accumulator through a chain of blocks it alone owns.
    """
    device = torch.device(device) if device is not None else default_device()
    if isinstance(images, torch.Tensor):
        imgs = images.to(device=device, dtype=torch.float32)
    else:
        imgs = torch.as_tensor(np.asarray(images, dtype=np.float32), device=device)
    n = imgs.shape[-1]
    if (pad * n) % 2:
        raise ValueError(f"the padded box pad × N must be even (N = {n}, pad = {pad})")
    rows = np.arange(imgs.shape[0]) if select is None else np.asarray(select, dtype=np.int64).reshape(-1)
    b = len(rows)

    def pick(v, width=None):
        if v is None:
            return None
        v = np.asarray(v, dtype=np.float64)
        if v.ndim == 0:
            return v
        v = v.reshape(-1, width) if width else v.reshape(-1)
        return v if select is None else v[rows]

    if into is not None:
        if (into.box, into.pad) != (n, pad):
            raise ValueError(f"accumulate into box/pad {into.box}/{into.pad}, images are {n} px with pad {pad}")
        acc = into
    else:
        acc = empty_accumulator(n, pad, device)
    rot = pick(rotations, 9).reshape(-1, 3, 3)
    origins_px, defocus = pick(origins_px, 2), pick(defocus, 3)
    phase_shift, bfactor, ctf_scale = pick(phase_shift), pick(bfactor), pick(ctf_scale)
    sym = _symmetry_ops(symmetry)
    kx, ky, sel = _inside(n, device)
    mult = torch.where(kx == 0, 0.5, 1.0)  # the column kx = 0 holds both members of each Friedel pair
    k2 = torch.stack([kx, ky], 1)  # (K, 2)
    if defocus is not None:
        from .ctf import ctf_2d

        if optics is None:
            raise ValueError("accumulate: defocus given without optics (voltage, cs, amplitude_contrast)")
        defocus = np.asarray(defocus, dtype=np.float64).reshape(-1, 3)
        fkx, fky = kx / (n * pixel_size), ky / (n * pixel_size)  # 1/Å

    def per(v, idx):
        if v is None:
            return 0.0
        v = np.asarray(v, dtype=np.float64)
        return v[idx] if v.ndim else float(v)

    origins = np.zeros((b, 2)) if origins_px is None else np.asarray(origins_px, dtype=np.float64).reshape(b, 2)
    # the image centre (index N//2) is moved to the origin by the phase ramp, together with the
    # shift by +origin: exp(-2πi k·(origin + N/2)/N) (no real-space ifftshift needed)
    origins = origins + n // 2
    shape = acc.sums.shape[:3]
    table = acc.sums.view(-1, 3)
    nsym = len(sym)
    k = len(kx)
    order = view_order(rot)  # slices in viewing-direction order: cache-friendly scatter
    if device.type == "cpu":  # slices per coordinate batch / per scatter piece
        piece = max(1, round(_SCATTER / k))
        prep = piece * max(1, round(_PREP / (piece * k)))
    else:
        prep = piece = batch * nsym
    for s in range(0, b, batch):
        ids = order[s:s + batch]
        bb = len(ids)
        f = torch.fft.rfft2(imgs[torch.as_tensor(rows[ids], device=device)]).reshape(bb, -1)[:, sel]  # (bb, K)
        o = torch.as_tensor(origins[ids], dtype=torch.float32, device=device)
        ph = torch.remainder(o @ k2.T, n) * (-2 * math.pi / n)
        f = f * torch.polar(mult.expand(bb, -1), ph)  # multiplicity folded into the ramp
        if defocus is not None:
            c = ctf_2d(fky, fkx, defocus[ids, 0], defocus[ids, 1], defocus[ids, 2], optics.voltage, optics.cs,
                       optics.amplitude_contrast, phase_shift=per(phase_shift, ids), bfactor=per(bfactor, ids),
                       scale=per(ctf_scale, ids) if ctf_scale is not None else 1.0)
            vals = torch.stack([f.real * c, f.imag * c, c * c * mult], -1)
        elif ctf_scale is not None:  # no CTF, but per-particle weights: the "CTF" is the scale
            c = torch.as_tensor(np.broadcast_to(per(ctf_scale, ids), (bb,)).copy(), dtype=torch.float32,
                                device=device)[:, None]
            vals = torch.stack([f.real * c, f.imag * c, (c * c) * mult], -1)
        else:
            vals = torch.stack([f.real, f.imag, mult.expand(bb, -1)], -1)
        # orientations A·g for every symmetry element: rows 0, 1 of (A g) span the slice
        r = torch.as_tensor(pad * np.einsum("bij,gjk->bgik", rot[ids, :2], sym).reshape(-1, 2, 3),
                            dtype=torch.float32, device=device)
        for t in range(0, bb * nsym, prep):  # slices per coordinate batch
            rr = r[t:t + prep]
            coords = torch.matmul(rr.transpose(1, 2), k2.T).permute(1, 0, 2).reshape(3, -1)  # (3, P)
            base, ws, sign = _trilinear_planar(coords, shape)
            if nsym == 1:
                v = vals[t:t + len(rr)].reshape(-1, 3)  # a view: each image's values are used once
            else:
                v = vals[torch.arange(t, t + len(rr), device=device) // nsym].reshape(-1, 3)
            v[:, 1] *= sign  # Friedel mates: conjugate
            for u in range(0, len(rr) * k, piece * k):  # scatter in cache-sized pieces
                e = u + piece * k
                _scatter_planar(table, shape, base[u:e], [w[u:e] for w in ws], v[u:e])
    return FourierAccumulator(acc.sums, n, pad, acc.count + b * len(sym))


def _radius_half(m: int, device) -> torch.Tensor:
    """|k| (padded-grid voxels) at every voxel of the (M, M, M//2+1) half grid."""
    kz = torch.arange(m, device=device, dtype=torch.float32) - m // 2
    kx = torch.arange(m // 2 + 1, device=device, dtype=torch.float32)
    return torch.sqrt(kz[:, None, None] ** 2 + kz[None, :, None] ** 2 + kx[None, None, :] ** 2)


def _shells_half(m: int, pad: int, device) -> torch.Tensor:
    """Shell (of the unpadded box, RELION's ``round(|k|/pad)``) of every half-grid voxel."""
    return torch.round(_radius_half(m, device) / pad).to(torch.int64)


def shell_mean_weight(weight: torch.Tensor, box: int, pad: int) -> torch.Tensor:
    """Mean of the weight grid (M, M, M//2+1) over each shell 0 … N//2 (float64, (N//2+1,))."""
    m = box * pad
    sh = _shells_half(m, pad, weight.device).reshape(-1)
    nsh = box // 2 + 1
    keep = sh < nsh
    w = weight.reshape(-1)[keep].to(torch.float64)
    tot = torch.zeros(nsh, dtype=torch.float64, device=weight.device).index_add_(0, sh[keep], w)
    cnt = torch.zeros(nsh, dtype=torch.float64, device=weight.device).index_add_(0, sh[keep], torch.ones_like(w))
    return tot / cnt.clamp_min(1)


def ssnr_from_fsc(fsc: np.ndarray, floor: float = 1e-3, ceil: float = 0.999) -> np.ndarray:
    """Per-shell spectral SNR of one half map, ``FSC/(1−FSC)`` with FSC clipped to [floor, ceil]."""
    f = np.clip(np.asarray(fsc, dtype=np.float64), floor, ceil)
    return f / (1.0 - f)


def finalize(
    acc: FourierAccumulator,
    ssnr=None,
    *,
    weight_floor: float = 1e-3,
    mask_radius: float | None = None,
    mask_edge: float = 3.0,
    closed=None,
) -> torch.Tensor:
    """Real-space map (N, N, N) float32 from accumulated sums.

    ``ssnr`` None: plain inversion ``data / max(weight, floor)`` with ``floor`` = ``weight_floor``
    × the shell's mean weight (guards against CTF zeros). ``ssnr`` (N//2+1,) per-shell SSNR of
    *this* map: RELION's regularised (MAP) inversion ``data / (weight + w̄_shell / SSNR_shell)``
    (1/τ² added to the weights, τ² = SSNR·σ², σ² = 1/w̄). Frequencies beyond Nyquist are zero.
    Then inverse FFT of the ×pad grid, crop to N, divide by the trilinear gridding correction
    and, as RELION does (``softMaskOutsideMap``), replace everything beyond ``mask_radius`` px
    (default N/2, the inscribed sphere, where the reconstruction is noise only) by the mean
    there, with a raised-cosine edge of ``mask_edge`` px. ``mask_radius`` < 0: no mask.
    """
    n, pad = acc.box, acc.pad
    m = n * pad
    data, weight = acc.closed() if closed is None else closed
    device = data.device
    sh = _shells_half(m, pad, device)
    nsh = n // 2 + 1
    wbar = shell_mean_weight(weight, n, pad).to(torch.float32)
    shc = sh.clamp_max(nsh - 1)
    if ssnr is None:
        denom = torch.maximum(weight, (weight_floor * wbar)[shc])
    else:
        s = torch.as_tensor(np.asarray(ssnr, dtype=np.float64), device=device).to(torch.float32).clamp_min(1e-12)
        denom = weight + (wbar / s)[shc]
    out = data / denom.clamp_min(1e-30)
    out = torch.where(_radius_half(m, device) < m / 2, out, torch.zeros((), dtype=out.dtype, device=device))
    vol = torch.fft.irfftn(torch.fft.ifftshift(out, dim=(0, 1)), s=(m, m, m), dim=(0, 1, 2))
    vol = torch.fft.fftshift(vol)
    o = m // 2 - n // 2
    vol = vol[o:o + n, o:o + n, o:o + n] / gridding_correction(m, n, device)
    radius = n / 2 if mask_radius is None else mask_radius
    if radius >= 0:
        vol = mask_outside_sphere(vol, radius, mask_edge)
    return vol


def mask_outside_sphere(vol: torch.Tensor, radius: float, edge: float = 3.0) -> torch.Tensor:
    """Keep ``vol`` (N, N, N) inside ``radius`` px of the centre; beyond ``radius + edge`` set it to
    the background (the mean there, weighted by the edge), with a raised-cosine blend between."""
    n = vol.shape[0]
    c = torch.arange(n, device=vol.device, dtype=torch.float32) - n // 2
    r = torch.sqrt(c[:, None, None] ** 2 + c[None, :, None] ** 2 + c[None, None, :] ** 2)
    outer = radius + edge
    w = torch.where(r < radius, 0.0, torch.where(r > outer, 1.0, 0.5 + 0.5 * torch.cos(math.pi * (outer - r) / edge)))
    bg = (w * vol).sum() / w.sum().clamp_min(1e-12)
    return vol * (1 - w) + w * bg


def smooth_fsc(fsc: np.ndarray) -> np.ndarray:
    """FSC curve smoothed over neighbouring shells (weights ¼, ½, ¼; ends repeated)."""
    f = np.asarray(fsc, dtype=np.float64)
    p = np.concatenate([f[:1], f, f[-1:]])
    return (p[:-2] + 2 * p[1:-1] + p[2:]) / 4


def wiener_filter(vol, ssnr) -> torch.Tensor:
    """Multiply the transform of ``vol`` (N, N, N) by ``SSNR/(1+SSNR)`` (the MMSE gain) of its
    shell ``round(|k|)`` (N-grid voxels; shells beyond N//2 take the last value). Constant on each
    shell — the binning of :func:`cryodask.fsc.fsc_curve` — so the filter rescales shells and
    leaves every per-shell FSC unchanged."""
    v = torch.as_tensor(vol, dtype=torch.float32)
    n = v.shape[0]
    s = np.clip(np.asarray(ssnr, dtype=np.float64), 0.0, None)
    g = torch.as_tensor(s / (1.0 + s), dtype=torch.float32, device=v.device)
    kz = torch.fft.fftfreq(n, device=v.device) * n
    kx = torch.fft.rfftfreq(n, device=v.device) * n
    r = torch.sqrt(kz[:, None, None] ** 2 + kz[None, :, None] ** 2 + kx[None, None, :] ** 2)
    gain = g[torch.round(r).long().clamp_max(len(g) - 1)]
    return torch.fft.irfftn(torch.fft.rfftn(v) * gain, s=v.shape)


def random_subsets(n: int, seed: int = 0) -> np.ndarray:
    """Random half assignment 1/2 for ``n`` particles (equal sizes ±1), seeded."""
    rng = np.random.default_rng(seed)
    s = np.ones(n, dtype=np.int64)
    s[rng.permutation(n)[: n // 2]] = 2
    return s


@dataclass
class Reconstruction:
    """Result of a gold-standard reconstruction (maps float32 (N, N, N) numpy, pixel size Å).

    ``map``: all particles, Wiener-filtered (per-shell gain from the gold-standard FSC);
    ``map_unfiltered``: the same before the filter; ``half1``/``half2``: unfiltered half maps;
    ``fsc``: gold-standard FSC of the halves (phase-randomisation-corrected when a particle mask
    was used); ``fsc_unmasked``: FSC of the halves as written; ``ssnr``: per-shell SSNR of one half.
    """

    map: np.ndarray
    map_unfiltered: np.ndarray
    half1: np.ndarray
    half2: np.ndarray
    fsc: np.ndarray
    fsc_unmasked: np.ndarray
    ssnr: np.ndarray
    pixel_size: float
    counts: tuple[int, int]
    extra: dict = field(default_factory=dict)

    def resolution(self) -> dict[str, float]:
        from .fsc import resolution

        return resolution(self.fsc, self.pixel_size, self.map.shape[0])


def gold_standard(acc1: FourierAccumulator, acc2: FourierAccumulator, pixel_size: float, *,
                  regularise: str = "none", mask_diameter: float | None = None,
                  iterations: int = 2) -> Reconstruction:
    """Half maps, combined map and FSC from the two halves' sums (which never mix before here).

    ``regularise="none"`` (default): plain inversion of each half and of all particles; the
    combined map is then Wiener-filtered per shell with ``SSNR_all = 2·SSNR_half`` from the
    (lightly smoothed) half-map FSC. ``"tau2"``: RELION's MAP inversion, 1/τ² from the FSC added to
    the weights (iterated ``iterations`` times from the plain halves' FSC). ``mask_diameter`` (Å):
    a soft spherical particle mask (RELION's ``--particle_diameter``) for the combined map; the
    FSC is then measured with that mask and corrected by phase randomisation.
    """
    from .fsc import fsc_curve, masked_fsc, soft_sphere

    n = acc1.box
    c1, c2 = acc1.closed(), acc2.closed()
    both = (c1[0] + c2[0], c1[1] + c2[1])
    h1 = finalize(acc1, closed=c1).cpu().numpy()
    h2 = finalize(acc2, closed=c2).cpu().numpy()
    fsc_box = fsc_curve(h1, h2)
    radius = None
    if mask_diameter:
        radius = mask_diameter / (2 * pixel_size)
        mask = soft_sphere(n, radius, 5.0)
        fsc = masked_fsc(h1, h2, mask)["corrected"]
    else:
        fsc = fsc_box
    unfil = finalize(acc1, closed=both, mask_radius=radius, mask_edge=5.0 if radius else 3.0)
    ssnr = ssnr_from_fsc(smooth_fsc(fsc))
    if regularise == "tau2":
        for _ in range(max(1, iterations)):
            h1 = finalize(acc1, ssnr, closed=c1).cpu().numpy()
            h2 = finalize(acc2, ssnr, closed=c2).cpu().numpy()
            fsc = fsc_curve(h1, h2) if not mask_diameter else masked_fsc(h1, h2, mask)["corrected"]
            ssnr = ssnr_from_fsc(fsc)
        vol = finalize(acc1, 2 * ssnr, closed=both, mask_radius=radius, mask_edge=5.0 if radius else 3.0)
        fsc_box = fsc_curve(h1, h2)
    elif regularise == "none":
        vol = wiener_filter(unfil, 2 * ssnr)
    else:
        raise ValueError(f"regularise must be 'none' or 'tau2', not {regularise!r}")
    return Reconstruction(vol.cpu().numpy().astype(np.float32), unfil.cpu().numpy().astype(np.float32),
                          h1.astype(np.float32), h2.astype(np.float32), fsc, fsc_box, ssnr, pixel_size,
                          (acc1.count, acc2.count))


# ------------------------------------------------------------------------------- Dask graph


def _combine_owned(a: FourierAccumulator, b: FourierAccumulator) -> FourierAccumulator:
    """:func:`combine` that adds ``b`` into ``a``'s tensor. Only for the graph's own tree, where
    every partial sum is consumed exactly once (saves allocating a new grid per node)."""
    if (a.box, a.pad) != (b.box, b.pad):
        raise ValueError(f"cannot combine accumulators of box/pad {a.box}/{a.pad} and {b.box}/{b.pad}")
    a.sums.add_(b.sums.to(a.sums.device))
    return FourierAccumulator(a.sums, a.box, a.pad, a.count + b.count)


def _tree_sum(items: list):
    """Binary tree of delayed combine calls over ``items`` (delayed accumulators of this graph)."""
    from dask import delayed

    level = list(items)
    while len(level) > 1:
        nxt = [delayed(_combine_owned, pure=True)(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            nxt.append(level[-1])
        level = nxt
    return level[0]


def _accumulate_pair(accs, images, params: dict, subsets: np.ndarray, kwargs: dict):
    """Add one block's particles to its lane's two accumulators, each half to its own (in place;
    the lane owns them). ``accs``: (acc1, acc2) or None for the lane's first block."""
    images = np.asarray(images)
    out = []
    for h in (1, 2):
        rows = np.nonzero(subsets == h)[0]
        acc = None if accs is None else accs[h - 1]
        if len(rows):
            acc = accumulate(images, params["rotations"], params.get("origins_px"), params.get("defocus"),
                             phase_shift=params.get("phase_shift"), bfactor=params.get("bfactor"),
                             ctf_scale=params.get("ctf_scale"), select=rows, into=acc, **kwargs)
        elif acc is None:
            acc = empty_accumulator(images.shape[-1], kwargs["pad"], kwargs["device"])
        out.append(acc)
    return tuple(out)


def _half_of(accs, h: int) -> FourierAccumulator:
    return accs[h - 1]


def particle_parameters(table, pixel_size: float) -> dict[str, np.ndarray]:
    """Per-particle arrays for :func:`accumulate` from a RELION particle table (pandas or dict
    of columns): rotations (n, 3, 3), origins_px (n, 2), defocus (n, 3) (None without
    rlnDefocusU), phase_shift, bfactor, ctf_scale (None when absent)."""
    from .geometry import euler_to_matrix

    def col(name, default=None):
        if name in table:
            return np.asarray(table[name], dtype=np.float64)
        return default

    n = len(table["rlnAngleRot"])
    out = {"rotations": euler_to_matrix(col("rlnAngleRot"), col("rlnAngleTilt"), col("rlnAnglePsi"))}
    ox, oy = col("rlnOriginXAngst"), col("rlnOriginYAngst")
    if ox is not None:
        out["origins_px"] = np.stack([ox, oy if oy is not None else np.zeros(n)], 1) / pixel_size
    elif col("rlnOriginX") is not None:
        out["origins_px"] = np.stack([col("rlnOriginX"), col("rlnOriginY", np.zeros(n))], 1)
    du = col("rlnDefocusU")
    if du is not None:
        out["defocus"] = np.stack([du, col("rlnDefocusV", du), col("rlnDefocusAngle", np.zeros(n))], 1)
    for key, name in (("phase_shift", "rlnPhaseShift"), ("bfactor", "rlnCtfBfactor"), ("ctf_scale", "rlnCtfScalefactor")):
        v = col(name)
        if v is not None and np.any(v != (1.0 if key == "ctf_scale" else 0.0)):
            out[key] = v
    return out


def reconstruct_graph(
    images,
    table,
    *,
    pixel_size: float,
    optics=None,
    ctf: bool = True,
    symmetry="C1",
    pad: int = 2,
    subsets=None,
    seed: int = 0,
    chunk: int = 2000,
    device=None,
    regularise: str = "none",
    mask_diameter: float | None = None,
    final_threads: int | None = None,
    lanes: int = 2,
):
    """Lazy gold-standard reconstruction: a ``dask.delayed`` whose value is a :class:`Reconstruction`.

    ``images``: dask array (n, N, N) chunked along the particles only, a numpy array (sliced into
    ``chunk``-sized blocks) or a list of ``(block, count)`` pairs (block: a delayed/array of
    ``count`` images, in table order). ``table``: RELION particle columns (see
    :func:`particle_parameters`). ``subsets`` (n,) of 1/2 (default: ``rlnRandomSubset`` from the
    table, else :func:`random_subsets` with ``seed``). The blocks are split into ``lanes``
    chains (run in parallel; use the number of workers): each chain accumulates its blocks into
    its own two grids, one per half (one task per block); a binary tree of combines sums the
    chains per half; one :func:`gold_standard` task at the root
    (``regularise``, ``mask_diameter``: see there; ``final_threads``: torch threads for that last
    task, which runs alone). The random subsets used are in the result's ``extra["subsets"]``.
    """
    from dask import delayed

    params = particle_parameters(table, pixel_size)
    if not ctf:
        params.pop("defocus", None)
    n = len(params["rotations"])
    if subsets is None:
        subsets = (np.asarray(table["rlnRandomSubset"], dtype=np.int64) if "rlnRandomSubset" in table
                   else random_subsets(n, seed))
    subsets = np.asarray(subsets)
    if set(np.unique(subsets)) - {1, 2}:
        raise ValueError("random subsets must be 1 or 2")
    blocks = _blocks(images, chunk)
    if sum(c for _, c in blocks) != n:
        raise ValueError(f"{sum(c for _, c in blocks)} images but {n} table rows")
    kwargs = {"pixel_size": pixel_size, "optics": optics, "symmetry": symmetry, "pad": pad, "device": device}
    # one chain of blocks per lane; each lane threads its own pair of accumulators through its
    # blocks (memory: 2 grids per lane, whatever the number of blocks), then a tree sums the lanes
    lanes = max(1, min(lanes, len(blocks)))
    bounds = np.linspace(0, len(blocks), lanes + 1).round().astype(int)
    lane_accs = []
    starts = np.cumsum([0] + [c for _, c in blocks])
    for li in range(lanes):
        accs = None
        for bi in range(bounds[li], bounds[li + 1]):
            block, count = blocks[bi]
            sl = slice(starts[bi], starts[bi] + count)
            bp = {k: v[sl] for k, v in params.items()}
            accs = delayed(_accumulate_pair, pure=True)(accs, block, bp, subsets[sl], kwargs)
        lane_accs.append(accs)
    if not (subsets == 1).any() or not (subsets == 2).any():
        raise ValueError("both random subsets need particles")
    halves = {h: [delayed(_half_of, pure=True)(a, h) for a in lane_accs] for h in (1, 2)}
    return delayed(_gold_standard_with_subsets, pure=True)(
        _tree_sum(halves[1]), _tree_sum(halves[2]), pixel_size, subsets, regularise, mask_diameter, final_threads)


def _gold_standard_with_subsets(acc1, acc2, pixel_size, subsets, regularise, mask_diameter,
                                final_threads) -> Reconstruction:
    prev = torch.get_num_threads()
    if final_threads:  # the root task runs alone: let torch's FFTs use the cores
        torch.set_num_threads(final_threads)
    try:
        rec = gold_standard(acc1, acc2, pixel_size, regularise=regularise, mask_diameter=mask_diameter)
    finally:
        torch.set_num_threads(prev)
    rec.extra["subsets"] = subsets
    return rec


def _blocks(images, chunk: int) -> list:
    if isinstance(images, list):
        return images
    if hasattr(images, "to_delayed") and hasattr(images, "chunks"):  # dask array
        if len(images.chunks[1]) != 1 or len(images.chunks[2]) != 1:
            raise ValueError("images must be chunked along the particle axis only")
        return list(zip(images.to_delayed().ravel().tolist(), images.chunks[0]))
    from dask import delayed

    return [(delayed(np.asarray(images[s:s + chunk]), pure=True), len(images[s:s + chunk]))
            for s in range(0, len(images), chunk)]


# ------------------------------------------------------------------------------ STAR driver


class _Optics:
    def __init__(self, voltage, cs, amplitude_contrast):
        self.voltage, self.cs, self.amplitude_contrast = float(voltage), float(cs), float(amplitude_contrast)


class _NotSimple(Exception):
    pass


def _parse_star_simple(text: str) -> dict[str, dict[str, np.ndarray]]:
    """Loops of a STAR file as {block: {label: object array of str}} for plain files (no quoted
    values, no multi-line values); raises :class:`_NotSimple` otherwise. Pure Python, no pandas:
    ~50× faster to import and run than a general parser for particle files."""
    if '"' in text or "'" in text or "\n;" in text:
        raise _NotSimple
    lines = text.splitlines()
    blocks: dict[str, dict[str, np.ndarray]] = {}
    name = None
    i = 0
    while i < len(lines):
        ln = lines[i].strip()
        i += 1
        if ln.startswith("data_"):
            name = ln[5:]
            blocks.setdefault(name, {})
        elif ln == "loop_" and name is not None:
            cols = []
            while i < len(lines) and lines[i].lstrip().startswith("_"):
                cols.append(lines[i].split()[0][1:])
                i += 1
            start = i
            while i < len(lines) and lines[i].strip() and not lines[i].lstrip().startswith(("data_", "loop_", "_")):
                i += 1
            tokens = " ".join(ln for ln in lines[start:i] if not ln.lstrip().startswith("#")).split()
            if not cols or len(tokens) % len(cols):
                raise _NotSimple
            arr = np.array(tokens, dtype=object).reshape(-1, len(cols))
            blocks[name] = {c: arr[:, j] for j, c in enumerate(cols)}
        elif ln.startswith("_") and name is not None:  # key-value block
            parts = ln.split()
            if len(parts) >= 2:
                blocks[name][parts[0][1:]] = np.array([parts[1]], dtype=object)
    return blocks


def _read_star(star_path: Path):
    """(particle columns {label: array}, optics {voltage, cs, amplitude_contrast}, pixel size Å)
    from a RELION 3.1+ or legacy particle STAR. Numeric columns come back float64, names str."""
    from .errors import InputError

    try:
        text = star_path.read_text()
    except OSError as err:
        raise InputError(star_path, f"cannot read STAR file ({err.strerror or err})") from None
    try:
        blocks = _parse_star_simple(text)
    except _NotSimple:
        import starfile

        try:
            raw = starfile.read(star_path, always_dict=True)
        except Exception as err:
            raise InputError(star_path, f"cannot parse STAR file ({err})") from None
        blocks = {k: {c: v[c].to_numpy() for c in v.columns} for k, v in raw.items() if hasattr(v, "columns")}
    parts = blocks.get("particles")
    if not parts or "rlnImageName" not in parts:
        parts = next((b for k, b in blocks.items() if k != "optics" and "rlnImageName" in b), None)
    if parts is None:
        raise InputError(star_path, "no particle table with rlnImageName")
    missing = [c for c in ("rlnImageName", "rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi") if c not in parts]
    if missing:
        raise InputError(star_path, f"missing columns {', '.join(missing)}")
    cols = {}
    for k, v in parts.items():
        if k in ("rlnImageName", "rlnMicrographName", "rlnOpticsGroupName"):
            cols[k] = np.asarray(v, dtype=str)
            continue
        try:
            cols[k] = np.asarray(v, dtype=np.float64)
        except (TypeError, ValueError):
            cols[k] = np.asarray(v, dtype=str)
    optics = blocks.get("optics")

    def value(name, default=None):
        if optics and name in optics:
            vals = np.unique(np.asarray(optics[name], dtype=np.float64))
            if len(vals) > 1:
                raise InputError(star_path, f"optics groups with different {name} are not supported yet")
            return float(vals[0])
        if name in cols:
            vals = np.unique(np.asarray(cols[name], dtype=np.float64))
            if len(vals) > 1:
                raise InputError(star_path, f"particles with different {name} are not supported yet")
            return float(vals[0])
        return default

    apix = value("rlnImagePixelSize") or value("rlnPixelSize")
    if apix is None and value("rlnDetectorPixelSize") and value("rlnMagnification"):
        apix = value("rlnDetectorPixelSize") * 1e4 / value("rlnMagnification")
    opt = {"voltage": value("rlnVoltage", 300.0), "cs": value("rlnSphericalAberration", 2.7),
           "amplitude_contrast": value("rlnAmplitudeContrast", 0.1), "image_size": value("rlnImageSize")}
    return cols, opt, apix


def _image_blocks(star_path: Path, names, chunk: int) -> list:
    """``(delayed image read, count)`` per ``chunk`` consecutive rows of the table (a block may
    span several stacks). Stack paths are resolved against the STAR file's folder (falling back
    to the bare file name there, for STAR files that kept RELION's project paths)."""
    from dask import delayed

    from .errors import InputError

    idx = np.empty(len(names), dtype=np.int64)
    files = []
    resolved: dict[str, str] = {}
    for i, s in enumerate(names):
        a, _, b = str(s).partition("@")
        if not b or not a.strip().isdigit():
            raise InputError(star_path, f"rlnImageName {s!r} is not of the form N@stack.mrcs")
        idx[i] = int(a) - 1
        if b not in resolved:
            path = Path(b) if Path(b).is_absolute() else star_path.parent / b
            if not path.exists() and (star_path.parent / Path(b).name).exists():
                path = star_path.parent / Path(b).name
            if not path.exists():
                raise InputError(path, f"particle stack not found (referenced by {star_path.name})")
            resolved[b] = str(path)
        files.append(resolved[b])
    files = np.asarray(files, dtype=object)
    return [(delayed(_read_images, pure=True)(files[s:s + chunk], idx[s:s + chunk]), len(idx[s:s + chunk]))
            for s in range(0, len(idx), chunk)]


def _read_images(files: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """Images ``indices`` (0-based) of stacks ``files`` (one entry per image), float32 (n, y, x).

    Reads runs of consecutive images with one slice of the memory-mapped stack each; checks
    indices and that the values are finite (one pass), raising InputError naming the file."""
    import warnings

    import mrcfile

    from .errors import InputError
    from .io.mrc import header_info

    out = None
    for f in dict.fromkeys(files.tolist()):
        sel = np.nonzero(files == f)[0]
        info = header_info(f)
        shape = info["shape"] if len(info["shape"]) == 3 else (1,) + tuple(info["shape"])
        if out is None:
            out = np.empty((len(indices),) + tuple(shape[1:]), np.float32)
        elif tuple(shape[1:]) != out.shape[1:]:
            raise InputError(f, f"images of {shape[1]}×{shape[2]} px, others {out.shape[1]}×{out.shape[2]}")
        idx = indices[sel]
        bad = idx[(idx < 0) | (idx >= shape[0])]
        if bad.size:
            raise InputError(f, f"image index {int(bad[0])} (0-based) out of range: stack has {shape[0]} images")
        if info["dtype"] == np.dtype("<f4") and info["axis_order"] is None:  # plain reads, no mmap
            nbytes = int(np.prod(shape[1:])) * 4
            with open(f, "rb", buffering=0) as fh:
                cut = np.nonzero(np.diff(idx) != 1)[0] + 1
                for r0, r1 in zip(np.r_[0, cut], np.r_[cut, len(idx)]):
                    fh.seek(info["data_offset"] + int(idx[r0]) * nbytes)
                    if sel[r1 - 1] - sel[r0] == r1 - r0 - 1:  # contiguous in the output too
                        fh.readinto(memoryview(out[sel[r0]:sel[r0] + (r1 - r0)]).cast("B"))
                    else:
                        for k in range(r0, r1):
                            fh.readinto(memoryview(out[sel[k]]).cast("B"))
            part = out if len(sel) == len(out) else out[sel]
            if not np.isfinite(np.sum(part, dtype=np.float64)):
                raise InputError(f, "contains NaN/Inf pixels")
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with mrcfile.mmap(f, mode="r", permissive=True) as m:
                data = m.data if m.data.ndim == 3 else m.data[None]
                if info["axis_order"] is not None:
                    data = data.transpose(info["axis_order"])
                cut = np.nonzero(np.diff(idx) != 1)[0] + 1
                if len(cut) > len(idx) // 8:  # scattered: one gather
                    out[sel] = data[idx]
                else:  # runs of consecutive indices → one slice each
                    for r0, r1 in zip(np.r_[0, cut], np.r_[cut, len(idx)]):
                        out[sel[r0:r1]] = data[idx[r0]:idx[r0] + (r1 - r0)]
        part = out if len(sel) == len(out) else out[sel]
        if not np.isfinite(np.sum(part, dtype=np.float64)):
            raise InputError(f, "contains NaN/Inf pixels")
    return out


def reconstruct_star(
    star_path,
    out_dir,
    *,
    symmetry: str = "C1",
    ctf: bool = True,
    pad: int = 2,
    chunk: int | None = None,
    threads: int | None = None,
    seed: int = 0,
    device=None,
    mask_diameter: float | None = None,
    regularise: str = "none",
    png: bool = True,
) -> dict:
    """Reconstruct a RELION particle STAR with its poses; write maps, FSC CSV and PNG.

    Writes into ``out_dir``: ``map.mrc`` (all particles, Wiener-filtered with the gold-standard
    SSNR), ``map_unfil.mrc`` (before the filter), ``half1.mrc`` / ``half2.mrc`` (unfiltered
    half maps of the two random subsets — ``rlnRandomSubset`` when the STAR has it, else seeded
    halves), ``fsc.csv`` and ``fsc.png`` (gold-standard half-map FSC). The Dask graph runs on the
    local threaded scheduler with ``threads`` workers (default: all cores; torch then uses one
    thread per worker, and ``threads`` for the final inverse FFTs of grids ≥ 256³); ``chunk``
    particles per block
    (default: about four blocks per worker, ≤ 128 MB each; blocks group neighbouring viewing
    directions). ``mask_diameter`` (Å): soft spherical
    particle mask, FSC corrected by phase randomisation (see :func:`gold_standard`).

    Returns figures: ``n_particles``, ``half_sizes``, ``box``, ``pixel_size`` (Å), ``symmetry``,
    ``fsc0.5`` and ``fsc0.143`` (Å, gold-standard), ``files`` (written paths).
    """
    import os

    import dask

    from .fsc import write_fsc_csv
    from .io.mrc import write_map

    star_path, out_dir = Path(star_path), Path(out_dir)
    parts, opt, apix = _read_star(star_path)
    if apix is None:
        from .errors import InputError

        raise InputError(star_path, "no pixel size (rlnImagePixelSize) in the optics table")
    threads = threads or os.cpu_count() or 1
    box = int(opt["image_size"] or 64)  # for sizing heuristics only
    if not chunk:  # about four blocks per worker, each at most ~128 MB of images
        cap = max(256, (128 << 20) // (4 * max(box, 64) ** 2))
        chunk = int(np.clip(math.ceil(len(parts["rlnImageName"]) / (4 * threads)), 64, cap))
    n_particles = len(parts["rlnImageName"])
    table = {c: v for c, v in parts.items() if c != "rlnImageName" and v.dtype.kind == "f"}
    subsets = (np.asarray(table["rlnRandomSubset"], dtype=np.int64) if "rlnRandomSubset" in table
               else random_subsets(n_particles, seed))
    # blocks of particles with neighbouring viewing directions: their slices overlap in the 3D
    # grids, so the back-projection stays in cache (the sums do not depend on the order)
    from .geometry import euler_to_matrix

    order = view_order(euler_to_matrix(table["rlnAngleRot"], table["rlnAngleTilt"], table["rlnAnglePsi"]))
    table = {c: v[order] for c, v in table.items()}
    blocks = _image_blocks(star_path, parts["rlnImageName"][order], chunk)
    optics = _Optics(opt["voltage"], opt["cs"], opt["amplitude_contrast"])
    graph = reconstruct_graph(blocks, table, pixel_size=apix, optics=optics, ctf=ctf, symmetry=symmetry,
                              pad=pad, subsets=subsets[order], device=device, regularise=regularise,
                              mask_diameter=mask_diameter, lanes=threads,
                              final_threads=threads if pad * box >= 256 else None)  # big FFTs only
    prev = torch.get_num_threads()
    torch.set_num_threads(1)  # parallelism comes from the Dask workers (intra-op threads only spin)
    try:
        rec = dask.compute(graph, scheduler="threads", num_workers=threads)[0]
    finally:
        torch.set_num_threads(prev)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {name: out_dir / f"{name}.mrc" for name in ("map", "map_unfil", "half1", "half2")}
    for name, vol in (("map", rec.map), ("map_unfil", rec.map_unfiltered), ("half1", rec.half1), ("half2", rec.half2)):
        write_map(files[name], vol, apix)
    n = rec.map.shape[0]
    curves = {"fsc": rec.fsc}
    if mask_diameter:
        curves["fsc_unmasked"] = rec.fsc_unmasked
    files["fsc.csv"] = out_dir / "fsc.csv"
    write_fsc_csv(files["fsc.csv"], curves, n, apix)
    res = rec.resolution()
    if png:
        from .fsc import write_fsc_png

        files["fsc.png"] = out_dir / "fsc.png"
        write_fsc_png(files["fsc.png"], {"half maps" + (" (masked, corrected)" if mask_diameter else ""): rec.fsc},
                      n, apix, title=f"{n_particles} particles, {symmetry}: FSC0.143 = {res['fsc0.143']:.2f} Å")
    return {"n_particles": int(n_particles), "half_sizes": [int(c) for c in rec.counts], "box": int(n),
            "pixel_size": float(apix), "symmetry": symmetry, **{k: float(v) for k, v in res.items()},
            "files": {k: str(v) for k, v in files.items()}}


def main(argv=None) -> int:
    """``python -m cryodask.reconstruct particles.star OUT_DIR [options]``: see :func:`reconstruct_star`."""
    import argparse
    import json

    ap = argparse.ArgumentParser(prog="python -m cryodask.reconstruct",
                                 description="Gold-standard Fourier reconstruction of a particle STAR with known poses.")
    ap.add_argument("star", help="RELION particle STAR (angles, origins, CTF)")
    ap.add_argument("out", help="output folder")
    ap.add_argument("--symmetry", default="C1", help="point group: C1, Cn, Dn, T, O, I")
    ap.add_argument("--no-ctf", action="store_true", help="ignore the CTF")
    ap.add_argument("--pad", type=int, default=2, help="Fourier oversampling (default 2)")
    ap.add_argument("--chunk", type=int, help="particles per block (default: ~4 blocks per thread)")
    ap.add_argument("--threads", type=int, help="worker threads (default: all cores)")
    ap.add_argument("--mask-diameter", type=float, help="soft spherical particle mask, Å")
    ap.add_argument("--regularise", choices=["none", "tau2"], default="none")
    ap.add_argument("--no-png", action="store_true")
    a = ap.parse_args(argv)
    fig = reconstruct_star(a.star, a.out, symmetry=a.symmetry, ctf=not a.no_ctf, pad=a.pad, chunk=a.chunk,
                           threads=a.threads, mask_diameter=a.mask_diameter, regularise=a.regularise,
                           png=not a.no_png)
    print(json.dumps(fig))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
