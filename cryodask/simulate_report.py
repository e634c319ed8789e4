"""Figures for a simulated dataset: a montage of micrographs and particles (for the report)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["montage"]


def montage(out: Path, n_mics: int = 3, n_particles: int = 10) -> str:
    """PNG montage: ``n_mics`` micrographs with ground-truth centres coloured by view class
    (top = cyan, side = orange), and clean vs noisy boxes of a few particles. Returns its name."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from skimage.filters import gaussian

    from .io.mrc import read_mrc, read_stack
    from .io.star import read_particles
    from .model import table_to_frame

    truth = table_to_frame(read_particles(out / "truth_particles.star"))
    mics = sorted(truth["rlnMicrographName"].unique())[:n_mics]
    ncol = max(len(mics), 1)
    fig = plt.figure(figsize=(5 * ncol, 12))
    gs = fig.add_gridspec(3, ncol, height_ratios=[1, 1, 0.45])
    axes = np.array([[fig.add_subplot(gs[r, c]) for c in range(ncol)] for r in range(2)])
    for ax, ax_s, name in zip(axes[0], axes[1], mics):
        img, _ = read_mrc(out / name)
        rows = truth[truth["rlnMicrographName"] == name]
        ax.imshow(img, cmap="gray")
        for view, colour in (("top", "cyan"), ("side", "orange")):
            sel = rows[rows["cdViewClass"] == view]
            ax.scatter(sel["rlnCoordinateX"], sel["rlnCoordinateY"], s=12, c=colour, marker="+", label=view)
        ax.set_title(f"{Path(name).name}: {len(rows)} particles")
        ax.legend(loc="upper right", fontsize=8)
        ax.axis("off")
        ax_s.imshow(gaussian(img, 2), cmap="gray")
        ax_s.set_title("low-pass filtered (σ = 2 px)")
        ax_s.axis("off")
    # particle gallery: clean (top row) and noisy cut from the micrograph (bottom row)
    rows = truth[truth["rlnMicrographName"] == mics[0]].head(n_particles)
    img, _ = read_mrc(out / mics[0])
    stack, idx = rows["rlnImageName"].iloc[0].split("@")[1], [int(s.split("@")[0]) - 1 for s in rows["rlnImageName"]]
    clean = read_stack(out / stack, idx)
    box = clean.shape[-1]
    h = box // 2
    noisy = [-img[int(y) - h:int(y) - h + box, int(x) - h:int(x) - h + box]
             for x, y in zip(rows["rlnCoordinateX"], rows["rlnCoordinateY"])]
    k = len(clean)
    gal = np.zeros((2 * box, k * box), np.float32)
    for i in range(k):
        c, nz = clean[i], noisy[i]
        gal[:box, i * box:(i + 1) * box] = (c - c.mean()) / (c.std() + 1e-9)
        gal[box:, i * box:(i + 1) * box] = (nz - nz.mean()) / (nz.std() + 1e-9)
    ax = fig.add_subplot(gs[2, :])
    ax.imshow(gal, cmap="gray", vmin=-3, vmax=3)
    ax.set_title("particles of the first micrograph: noise-free (top) / as in the micrograph, inverted (bottom)")
    ax.axis("off")
    fig.tight_layout()
    name = "simulation_montage.png"
    fig.savefig(out / name, dpi=60)
    plt.close(fig)
    return name
