"""Ground-truth measurement of every stage of a run on simulated data.

Given the folder written by ``cryodask simulate`` (``truth_particles.star``,
``truth_volume.mrc``), these functions compare a run's outputs with the truth the same way the
acceptance checks in ``../shared/checks`` do:

* picking: precision / recall / F1 with one-to-one matching within ``match_px`` (Hungarian on
  raw distances, exactly as ``pick_f1.py``) and view-class accuracy of the matched picks;
* CTF: defocus error per micrograph;
* 2D alignment: in-plane angle and shift errors of matched particles after removing the one
  global rotation/shift (as ``align_error.py``);
* 3D: FSC of the map against the truth volume after superposition (rotation, translation,
  hand; :func:`cryodask.map_align.align_map`), and the known-pose reconstruction of the same
  picked particles (truth poses and CTF) that sets the limit the data allow.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

__all__ = ["load_truth", "match_picks", "evaluate_picking", "evaluate_ctf", "evaluate_map", "truth_pose_table"]


def load_truth(truth_dir: str | Path) -> pd.DataFrame:
    """The simulation's ground-truth particle table (micrograph names as stems)."""
    from .io.star import read_particles
    from .model import table_to_frame

    t = table_to_frame(read_particles(Path(truth_dir) / "truth_particles.star"))
    t["mic"] = t["rlnMicrographName"].map(lambda s: Path(str(s)).stem)
    return t


def match_picks(picks: pd.DataFrame, truth: pd.DataFrame, match_px: float) -> pd.DataFrame:
    """One-to-one matches (Hungarian on raw distances, as pick_f1.py) between picks and truth.

    ``picks`` needs ``mic``, ``rlnCoordinateX/Y``; returns rows ``pick_index``, ``truth_index``,
    ``distance`` for the pairs within ``match_px``.
    """
    from scipy.optimize import linear_sum_assignment
    from scipy.spatial.distance import cdist

    rows = []
    for mic, t in truth.groupby("mic"):
        p = picks[picks["mic"] == mic]
        if p.empty:
            continue
        d = cdist(p[["rlnCoordinateX", "rlnCoordinateY"]].to_numpy(float),
                  t[["rlnCoordinateX", "rlnCoordinateY"]].to_numpy(float))
        r, c = linear_sum_assignment(d)
        ok = d[r, c] <= match_px
        rows += [(p.index[i], t.index[j], d[i, j]) for i, j in zip(r[ok], c[ok])]
    return pd.DataFrame(rows, columns=["pick_index", "truth_index", "distance"])


def evaluate_picking(picks: pd.DataFrame, truth: pd.DataFrame, match_px: float) -> dict[str, Any]:
    """Precision, recall, F1 (overall) and view-class accuracy of the matched picks."""
    m = match_picks(picks, truth, match_px)
    mics = set(truth["mic"])
    n_p = int(picks["mic"].isin(mics).sum())
    n_t = len(truth)
    prec = len(m) / n_p if n_p else 0.0
    rec = len(m) / n_t if n_t else 0.0
    out = {"precision": prec, "recall": rec, "f1": 2 * prec * rec / (prec + rec) if prec + rec else 0.0,
           "n_picks": n_p, "n_truth": n_t, "match_px": match_px,
           "median_centre_error_px": float(m["distance"].median()) if len(m) else None}
    if "cdViewClass" in picks and "cdViewClass" in truth and len(m):
        pv = picks.loc[m["pick_index"], "cdViewClass"].astype(str).to_numpy()
        tv = truth.loc[m["truth_index"], "cdViewClass"].astype(str).to_numpy()
        out["view_accuracy"] = float(np.mean(pv == tv))
        out["views_truth"] = {str(k): int(v) for k, v in pd.Series(tv).value_counts().items()}
    return out


def evaluate_ctf(estimates: pd.DataFrame, truth: pd.DataFrame) -> dict[str, Any]:
    """Mean-defocus and astigmatism errors per micrograph; ``estimates`` indexed by ``mic``."""
    t = truth.groupby("mic")[["rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle"]].first()
    e = estimates.reindex(t.index)
    err = ((e["rlnDefocusU"] + e["rlnDefocusV"]) - (t["rlnDefocusU"] + t["rlnDefocusV"])).abs() / 2
    return {"defocus_error_median_A": float(err.median()), "defocus_error_max_A": float(err.max()),
            "n_micrographs": int(err.notna().sum())}


def truth_pose_table(particles: pd.DataFrame, truth: pd.DataFrame, match_px: float, pixel_size: float) -> pd.DataFrame:
    """For extracted particles (``mic``, ``rlnCoordinateX/Y`` = box centres), the true pose,
    origin relative to their own box (Å, RELION sign) and CTF of the particle each one picked;
    rows of unmatched particles are dropped. Index = the particle's row in ``particles``."""
    m = match_picks(particles, truth, match_px)
    t = truth.loc[m["truth_index"]].reset_index(drop=True)
    p = particles.loc[m["pick_index"]].reset_index()
    true_x = t["rlnCoordinateX"] - t["rlnOriginXAngst"] / pixel_size
    true_y = t["rlnCoordinateY"] - t["rlnOriginYAngst"] / pixel_size
    out = pd.DataFrame({
        "rlnAngleRot": t["rlnAngleRot"], "rlnAngleTilt": t["rlnAngleTilt"], "rlnAnglePsi": t["rlnAnglePsi"],
        "rlnOriginXAngst": (np.rint(p["rlnCoordinateX"]) - true_x) * pixel_size,
        "rlnOriginYAngst": (np.rint(p["rlnCoordinateY"]) - true_y) * pixel_size,
        "rlnDefocusU": t["rlnDefocusU"], "rlnDefocusV": t["rlnDefocusV"], "rlnDefocusAngle": t["rlnDefocusAngle"],
        "cdViewClass": t["cdViewClass"],
    })
    out.index = p["index"].to_numpy()
    return out


def evaluate_map(volume: np.ndarray, truth_volume: np.ndarray, pixel_size: float, *, symmetry: str = "C1",
                 align: bool = True) -> dict[str, Any]:
    """FSC of ``volume`` against the truth after superposition (rotation, shift, hand)."""
    from .fsc import fsc_curve, resolution
    from .map_align import align_map

    info: dict[str, Any] = {}
    if align:
        volume, info = align_map(volume, truth_volume, symmetry=symmetry, try_hand=True)
    curve = fsc_curve(volume, truth_volume)
    res = resolution(curve, pixel_size, volume.shape[0])
    return {"fsc_vs_truth_0.5_A": res["fsc0.5"], "fsc_vs_truth_0.143_A": res["fsc0.143"],
            "hand_flipped": bool(info.get("flipped", False)), "correlation": float(info.get("correlation", np.nan)),
            "curve": curve, "aligned": volume}
