"""PNG figures for the report (matplotlib, headless Agg backend).

Each function takes tables/images and a path, draws one figure and returns
the path. Images are shown in radiological convention as Slicer shows them:
axial and coronal views with the patient's right on the left of the picture.
"""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import SimpleITK as sitk  # noqa: E402

from ..labels import LABELS  # noqa: E402

DPI = 110
REGION_ORDER = [r.key for r in LABELS.lobes] + ["lung"]


def _save(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return path


def alignment_boxplots(metrics: pd.DataFrame, path) -> Path:
    """Before/after box plots per region of Dice, relative volume difference, Hausdorff 95
    and the intensity MSE (metrics rows of ``metrics.alignment_metrics`` plus case_id and stage)."""
    panels = [("dice", "Dice", REGION_ORDER), ("relative_volume_difference", "Relative volume difference",
                                                REGION_ORDER),
              ("hausdorff95_mm", "Hausdorff 95 (mm)", REGION_ORDER), ("mse", "Intensity MSE", ["image",
                                                                                               "lung_intensity"])]
    panels = [p for p in panels if p[0] in metrics and metrics[p[0]].notna().any()]
    stages = [s for s in ("before", "after") if s in set(metrics["stage"])] or sorted(metrics["stage"].unique())
    colours = {"before": "#c44e52", "after": "#4c72b0"}
    n_cols = 2 if len(panels) > 1 else 1
    n_rows = int(np.ceil(len(panels) / n_cols))
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(6.2 * n_cols, 3.3 * n_rows), squeeze=False)
    for ax in axes.ravel()[len(panels):]:
        ax.set_visible(False)
    rng = np.random.default_rng(0)  # jitter of the case dots only
    for ax, (column, title, regions) in zip(axes.ravel(), panels):
        regions = [r for r in regions if ((metrics["region"] == r) & metrics[column].notna()).any()]
        width = 0.8 / max(len(stages), 1)
        for s, stage in enumerate(stages):
            data = [metrics.loc[(metrics["region"] == r) & (metrics["stage"] == stage), column].dropna().to_numpy()
                    for r in regions]
            positions = np.arange(len(regions)) + (s - (len(stages) - 1) / 2) * width
            keep = [i for i, d in enumerate(data) if len(d)]
            if keep:
                parts = ax.boxplot([data[i] for i in keep], positions=positions[keep], widths=width * 0.9,
                                   patch_artist=True, showfliers=False, medianprops={"color": "black"})
                for box in parts["boxes"]:
                    box.set_facecolor(colours.get(stage, "#888888"))
                    box.set_alpha(0.6)
                for i in keep:  # every case as a dot: small cohorts stay readable
                    ax.scatter(positions[i] + rng.uniform(-0.25, 0.25, len(data[i])) * width, data[i], s=9,
                               color="black", alpha=0.6, zorder=3, linewidths=0)
            ax.plot([], [], color=colours.get(stage, "#888888"), lw=8, alpha=0.75, label=stage)
        ax.set_xticks(np.arange(len(regions)))
        ax.set_xticklabels([r.replace("_", "\n") for r in regions], fontsize=8)
        ax.set_title(title, loc="left", fontsize=11)
        ax.grid(axis="y", alpha=0.3)
        if column == "dice":
            ax.set_ylim(0, 1.02)
        ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def density_views(density: sitk.Image, template: sitk.Image, path, title: str = "",
                  diverging: bool = False, lung_mask: sitk.Image | None = None) -> Path:
    """Axial, coronal and sagittal slices through the density maximum (top row) and maximum
    intensity projections (bottom row; mean-signed for difference maps), over the template CT.

    Assumes an axis-aligned atlas grid (the template is built so)."""
    d = sitk.GetArrayFromImage(density).astype(float)   # (z, y, x): z up, y posterior, x left
    t = sitk.GetArrayFromImage(template).astype(float)
    sz, sy, sx = density.GetSpacing()[::-1]
    peak = np.unravel_index(np.argmax(np.abs(d)), d.shape)
    vmax = float(np.abs(d).max()) or 1.0
    cmap = "RdBu_r" if diverging else "hot"
    vmin = -vmax if diverging else 0.0

    def projection(axis):
        if diverging:
            idx = np.argmax(np.abs(d), axis=axis)
            return np.take_along_axis(d, np.expand_dims(idx, axis), axis).squeeze(axis)
        return d.max(axis=axis)

    views = [  # (title, template slice, density slice, aspect); images drawn with origin lower for z
        ("axial", t[peak[0]], d[peak[0]], projection(0), sy / sx, False),
        ("coronal", t[:, peak[1]], d[:, peak[1]], projection(1), sz / sx, True),
        ("sagittal", t[:, :, peak[2]], d[:, :, peak[2]], projection(2), sz / sy, True),
    ]
    fig, axes = plt.subplots(2, 3, figsize=(11, 7.2))
    image = None
    for col, (name, tslice, dslice, dproj, aspect, z_up) in enumerate(views):
        for row, (data, background) in enumerate(((dslice, tslice), (dproj, t.mean(axis=col)))):
            ax = axes[row, col]
            origin = "lower" if z_up else "upper"
            ax.imshow(np.clip(background, -1000, 400), cmap="gray", origin=origin, aspect=aspect)
            shown = np.ma.masked_where(np.abs(data) < 0.02 * vmax, data)
            image = ax.imshow(shown, cmap=cmap, vmin=vmin, vmax=vmax, origin=origin, aspect=aspect, alpha=0.8)
            ax.set_xticks([])
            ax.set_yticks([])
            label = "slice through peak" if row == 0 else ("projection (max)" if not diverging
                                                          else "projection (largest |difference|)")
            ax.set_title(f"{name}: {label}", fontsize=9)
            left, right = ("A", "P") if name == "sagittal" else ("R", "L")  # LPS: x to the left, y posterior
            ax.text(0.01, 0.02, left, color="white", transform=ax.transAxes, fontsize=9)
            ax.text(0.97, 0.02, right, color="white", transform=ax.transAxes, fontsize=9)
    fig.colorbar(image, ax=axes, shrink=0.8, label="nodules per mL per scan")
    fig.suptitle(title, fontsize=12)
    return _save(fig, path)


def lobe_rate_bars(rates: pd.DataFrame, path, title: str = "Volume-normalised nodule rate per lobe") -> Path:
    """Bars of rate (share of nodules / share of lung volume) with their CI, and shares side by side."""
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.8))
    x = np.arange(len(rates))
    colours = [np.array(LABELS.lobe(int(v)).color) / 255.0 for v in rates["lobe"]]
    # Clipped at 0: rounding can put a bound a hair past its estimate (e.g. a Wilson lower
    # bound of 5e-17 for a lobe with no nodules), which matplotlib refuses as negative.
    err = np.clip(np.vstack([rates["rate"] - rates["rate_ci_low"], rates["rate_ci_high"] - rates["rate"]]), 0, None)
    ax1.bar(x, rates["rate"], color=colours, edgecolor="black", yerr=err, capsize=4)
    ax1.axhline(1.0, color="black", lw=1, ls="--")
    ax1.set_xticks(x)
    ax1.set_xticklabels([k.replace("_", "\n") for k in rates["lobe_key"]])
    ax1.set_ylabel("rate (1 = as expected from volume)")
    ax1.set_title(f"rate with {rates['ci_method'].iloc[0]} CI", fontsize=10)
    width = 0.38
    share_err = np.clip(np.vstack([rates["share"] - rates["share_ci_low"], rates["share_ci_high"] - rates["share"]]),
                        0, None)
    ax2.bar(x - width / 2, rates["share"] * 100, width, yerr=share_err * 100, capsize=3, label="share of nodules",
            color="#4c72b0")
    ax2.bar(x + width / 2, rates["volume_share"] * 100, width, label="share of lung volume", color="#bbbbbb")
    ax2.set_xticks(x)
    ax2.set_xticklabels([k.replace("_", "\n") for k in rates["lobe_key"]])
    ax2.set_ylabel("%")
    ax2.legend(fontsize=8)
    ax2.set_title("shares", fontsize=10)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return _save(fig, path)


def group_lobe_shares(contingency: pd.DataFrame, path, title: str) -> Path:
    """Per group: share of its nodules in each lobe (grouped bars)."""
    shares = contingency.div(contingency.sum(axis=1).replace(0, np.nan), axis=0) * 100
    fig, ax = plt.subplots(figsize=(8, 3.4))
    n_groups = len(shares)
    width = 0.8 / max(n_groups, 1)
    x = np.arange(shares.shape[1])
    for g, (group, row) in enumerate(shares.iterrows()):
        n = int(contingency.loc[group].sum())
        ax.bar(x + (g - (n_groups - 1) / 2) * width, row.to_numpy(), width, label=f"{group} ({n} nodules)")
    ax.set_xticks(x)
    ax.set_xticklabels([c.replace("_", " ") for c in shares.columns])
    ax.set_ylabel("% of the group's nodules")
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)
