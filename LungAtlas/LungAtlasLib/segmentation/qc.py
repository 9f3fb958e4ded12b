"""Quality control of a lung / lobe label map: flags with reasons, never exceptions.

Every backend's result passes through :func:`quality_control`. The checks follow
the ones NCI Imaging Data Commons applied to its NLST TotalSegmentator results
(mask complete along z, one connected component, correct side by centre of mass,
volume >= 5 mL) plus two plausibility checks on the whole lung:

- ``present``: each region (lobe, or lung side) present with >= ``MIN_REGION_ML``;
- ``one_component``: the largest connected component holds >= ``MIN_DOMINANT_FRACTION``
  of the region and the other pieces together < ``MAX_FRAGMENT_ML`` (a stray fragment
  elsewhere is flagged);
- ``side``: right regions have their centre of mass on the patient's right of the
  lung's midline, left regions on the left (LPS: +x is the patient's LEFT);
- ``not_cut``: no lung in the first or last axial slice of the image (an apex or
  base cut off by the field of view);
- ``lung_volume``: total lung volume within ``LUNG_VOLUME_ML``;
- ``lung_hu``: fraction of lung voxels within ``LUNG_HU`` >= ``MIN_LUNG_HU_FRACTION``
  (a mask on the wrong image, or one swallowing the chest wall, fails it).

The record: ``{"passed": bool, "kind", "has_lobes", "volumes_ml", "flags": [{"check",
"region", "passed", "reason", value...}], "failed": [reasons], "notes": [...]}``.
"""
from __future__ import annotations

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from .. import io
from ..labels import LABELS

MIN_REGION_ML = 5.0
# One dominant component: the largest holds >= 95 % and the rest together stays
# under 1 mL (speckles of a few voxels are noise; a 1 mL piece is a fragment).
MIN_DOMINANT_FRACTION = 0.95
MAX_FRAGMENT_ML = 1.0
# Adult lungs on CT hold ~2-8 L (expiration to deep inspiration); beyond either
# end the mask is more likely wrong than the lungs unusual.
LUNG_VOLUME_ML = (1500.0, 9000.0)
# Lung parenchyma is ~-900..-700 HU; vessels filled into the mask and partial
# volume at the pleura sit above -500 HU and make up well under a third.
LUNG_HU = (-1024.0, -500.0)
MIN_LUNG_HU_FRACTION = 0.7
# Lung in an end slice counts as cut when it covers more than this area (mm^2):
# a few partial-volume voxels at a well-framed apex are not a cut.
CUT_AREA_MM2 = 100.0


def _regions(kind: str) -> list[tuple[int, str, str]]:
    """(value, name, side) of the regions a label map of this kind must hold."""
    if kind == "lobes":
        return [(r.value, r.name, r.side) for r in LABELS.lobes]
    if kind == "sides":
        return [(LABELS.right_lung.value, LABELS.right_lung.name, "right"),
                (LABELS.left_lung.value, LABELS.left_lung.name, "left")]
    raise ValueError(f"unknown label map kind {kind!r}; 'lobes' or 'sides'")


def _flag(flags: list, check: str, passed: bool, reason: str, region: str | None = None, **values) -> None:
    entry = {"check": check, "passed": bool(passed), "reason": reason}
    if region is not None:
        entry["region"] = region
    entry.update({k: v.item() if isinstance(v, np.generic) else v for k, v in values.items()})
    flags.append(entry)


def quality_control(labels: sitk.Image, ct: sitk.Image | None = None, kind: str = "lobes") -> dict:
    """QC record for a label map (``kind`` "lobes" 1-5 or "sides" 1 right / 2 left).

    ``ct`` (HU, same grid) enables the HU check; without it the check is skipped
    and a note says so. Geometry is read in LPS, whatever the file's axis order.
    """
    canonical, _ = io.to_canonical(labels)
    array = sitk.GetArrayViewFromImage(canonical)
    voxel_ml = float(np.prod(canonical.GetSpacing())) / 1000.0
    spacing = np.array(canonical.GetSpacing())  # x, y, z
    flags: list[dict] = []
    notes: list[str] = []
    lung = array > 0
    volumes = {}

    # Midline of the lung from the mask's own x-extent, independent of its labels,
    # so that a map with swapped sides cannot move the reference.
    midline_x = None
    if lung.any():
        xs = np.flatnonzero(lung.any(axis=(0, 1)))
        midline_x = float(canonical.TransformContinuousIndexToPhysicalPoint(
            ((xs[0] + xs[-1]) / 2.0, 0.0, 0.0))[0])

    # Work inside the lung's bounding box: QC runs on every case, at native resolution too.
    if lung.any():
        box = tuple(slice(int(v[0]), int(v[-1]) + 1) for v in
                    (np.flatnonzero(lung.any(axis=a)) for a in ((1, 2), (0, 2), (0, 1))))
    else:
        box = tuple(slice(0, 0) for _ in range(3))
    sub = np.asarray(array[box])
    offset_xyz = np.array([box[2].start, box[1].start, box[0].start], float)

    for value, name, side in _regions(kind):
        mask = sub == value
        volume = float(mask.sum()) * voxel_ml
        volumes[name] = round(volume, 1)
        present = volume >= MIN_REGION_ML
        _flag(flags, "present", present,
              f"{name}: {volume:.1f} mL" + ("" if present else f", below {MIN_REGION_ML:g} mL"
                                           + (" (missing)" if volume == 0 else "")),
              region=name, volume_ml=round(volume, 2))
        if volume == 0:
            continue
        labelled, n = ndimage.label(mask)
        sizes = np.bincount(labelled.ravel())[1:]
        fraction = float(sizes.max() / sizes.sum())
        fragments_ml = float(sizes.sum() - sizes.max()) * voxel_ml
        ok = fraction >= MIN_DOMINANT_FRACTION and fragments_ml < MAX_FRAGMENT_ML
        _flag(flags, "one_component", ok,
              f"{name}: {n} connected component(s), the largest holds {100 * fraction:.1f} %"
              + ("" if ok else f", {fragments_ml:.1f} mL in fragments apart from it"),
              region=name, components=int(n), dominant_fraction=round(fraction, 4),
              fragments_ml=round(fragments_ml, 2))
        centre_index = np.array([axis.mean() for axis in np.nonzero(mask)])[::-1] + offset_xyz  # x, y, z index
        centre_x = float(canonical.TransformContinuousIndexToPhysicalPoint(tuple(centre_index))[0])
        on_left = centre_x > midline_x
        ok = on_left == (side == "left")
        _flag(flags, "side", ok,
              f"{name}: centre of mass {centre_x - midline_x:+.1f} mm along LPS x from the lung midline "
              f"(patient's {'left' if on_left else 'right'})" + ("" if ok else f", expected {side}: sides swapped?"),
              region=name, offset_mm=round(centre_x - midline_x, 1))

    if lung.any():
        end_area = [float(lung[k].sum()) * spacing[0] * spacing[1] for k in (0, lung.shape[0] - 1)]
        cut_bottom, cut_top = end_area[0] > CUT_AREA_MM2, end_area[1] > CUT_AREA_MM2
        reason = (f"lung area in the bottom slice {end_area[0]:.0f} mm^2, top slice {end_area[1]:.0f} mm^2"
                  + ("" if not (cut_top or cut_bottom) else
                     ": lung cut by the field of view at the "
                     + " and ".join(w for w, c in (("top (apex)", cut_top), ("bottom (base)", cut_bottom)) if c)))
        _flag(flags, "not_cut", not (cut_top or cut_bottom), reason,
              top_area_mm2=round(end_area[1], 1), bottom_area_mm2=round(end_area[0], 1))

    total = float(lung.sum()) * voxel_ml
    ok = LUNG_VOLUME_ML[0] <= total <= LUNG_VOLUME_ML[1]
    _flag(flags, "lung_volume", ok,
          f"total lung volume {total:.0f} mL" + ("" if ok else
                                                 f", outside the plausible {LUNG_VOLUME_ML[0]:.0f}-{LUNG_VOLUME_ML[1]:.0f} mL"),
          volume_ml=round(total, 1))

    if ct is not None and lung.any():
        ct_canonical, _ = io.to_canonical(ct)
        if ct_canonical.GetSize() != canonical.GetSize():
            notes.append("HU check skipped: the CT is not on the label map's grid")
        else:
            hu = sitk.GetArrayViewFromImage(ct_canonical)[lung]
            fraction = float(np.mean((hu >= LUNG_HU[0]) & (hu <= LUNG_HU[1])))
            ok = fraction >= MIN_LUNG_HU_FRACTION
            _flag(flags, "lung_hu", ok,
                  f"{100 * fraction:.1f} % of lung voxels within {LUNG_HU[0]:.0f}..{LUNG_HU[1]:.0f} HU"
                  + ("" if ok else f" (< {100 * MIN_LUNG_HU_FRACTION:g} %: mask on the wrong image or "
                                   "covering non-lung tissue?)"),
                  fraction=round(fraction, 4))
    elif ct is None:
        notes.append("HU check skipped: no CT given")

    if kind == "sides":
        notes.append("no lobes: this label map holds the right (1) and left (2) lung only")
    failed = [f["reason"] for f in flags if not f["passed"]]
    return {"passed": not failed, "kind": kind, "has_lobes": kind == "lobes", "volumes_ml": volumes,
            "lung_volume_ml": round(total, 1), "flags": flags, "failed": failed, "notes": notes}
