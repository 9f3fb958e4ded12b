"""Offline lung fallback: right and left lung from intensity alone, no model weights.

Steps (all in the CT's own voxel grid, reoriented to LPS so that the axis
directions are known; HU values):

1. body: voxels above ``BODY_HU`` joined to the largest component, holes filled
   slice by slice (the outside air and the table are not body);
2. internal air: voxels below ``AIR_HU`` (-250 HU) inside the body;
3. airways: grown from a seed found in the trachea (a small, round, midline air
   region in the upper slices) with the darkest threshold that does not leak
   into the lungs; removed from the air mask;
4. lungs: the large remaining air components (bowel gas and small pockets
   dropped); when the two lungs touch (anterior junction) they are split by
   eroding until two large parts appear and growing them back inside the mask;
5. sides: by centre of mass along LPS x (+x is the patient's LEFT);
6. vessels inside the lung filled by a small 3D closing and 3D hole filling
   (a tumour touching the chest wall stays outside, as clinical contours do).

It produces ``kind="sides"`` (1 right lung, 2 left lung): no lobes.
"""
from __future__ import annotations

import time

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from .. import io
from ..labels import LABELS
from .base import SegmentationError, SegmentationResult, Segmenter
from .qc import quality_control

BODY_HU = -500.0      # soft tissue and bone are above, air and lung below
# Lung parenchyma (-950..-600 HU) and airway lumen are below. Halfway between lung
# and soft tissue would be ~-400 HU; clinical contours include the partial-volume
# rim at the pleura, which -250 HU keeps (on LUNG1-001 at 2 mm: Dice 0.958 at -400,
# 0.97-0.98 at -250..-200), while fat (-100 HU) stays out.
AIR_HU = -250.0
TRACHEA_AREA_MM2 = (100.0, 900.0)   # trachea cross-section: ~12-30 mm diameter
TRACHEA_MIDLINE_MM = 40.0           # trachea centre within this distance of the body's midline
MIN_LUNG_FRACTION = 0.15            # a lung component holds at least this fraction of the largest one
AIRWAY_THRESHOLDS_HU = (-990.0, -975.0, -960.0, -950.0, -940.0, -930.0, -920.0, -910.0, -900.0,
                        -880.0, -860.0, -840.0, -820.0, -800.0)  # partial volume at coarse spacing
TRACHEA_MIN_LENGTH_MM = 30.0         # the seed's air must continue downwards this far
AIRWAY_LEAK_ML = 250.0              # an airway tree larger than this has leaked into the lung
CLOSING_MM = 4.0                    # vessels thinner than ~2x this are filled back into the lung


class ClassicalSegmenter(Segmenter):
    """Threshold / connected-component lung segmentation (``kind="sides"``).

    Options: ``air_hu`` (default -250 HU), ``closing_mm`` (default 4 mm).
    """

    name = "classical"

    def __init__(self, air_hu: float = AIR_HU, closing_mm: float = CLOSING_MM):
        self.air_hu = float(air_hu)
        self.closing_mm = float(closing_mm)

    def segment(self, ct: sitk.Image, case_id: str = "case") -> SegmentationResult:
        start = time.perf_counter()
        canonical, original_orientation = io.to_canonical(ct)
        hu = sitk.GetArrayFromImage(canonical).astype(np.float32)   # z, y, x (LPS axes)
        spacing_zyx = np.array(canonical.GetSpacing()[::-1], float)
        try:
            sides, details = segment_lungs(hu, spacing_zyx, air_hu=self.air_hu, closing_mm=self.closing_mm)
        except SegmentationError as exc:
            raise SegmentationError(f"case {case_id}: classical lung segmentation failed: {exc}") from None
        labels = sitk.GetImageFromArray(sides)
        labels.CopyInformation(canonical)
        labels = io.from_canonical(labels, original_orientation)
        qc = quality_control(labels, ct, kind="sides")
        details["seconds"] = round(time.perf_counter() - start, 3)
        return SegmentationResult(labels=labels, kind="sides", backend=self.name, qc=qc,
                                  info={"backend": self.name, "air_hu": self.air_hu,
                                        "closing_mm": self.closing_mm, **details})


def _ball(radius_vox_zyx) -> np.ndarray:
    r = np.maximum(np.round(np.asarray(radius_vox_zyx)).astype(int), 0)
    grid = np.ogrid[tuple(slice(-k, k + 1) for k in r)]
    return sum((g / max(k, 0.5)) ** 2 for g, k in zip(grid, r)) <= 1.0


def _largest_components(mask: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
    """Label map of the ``count`` largest 6-connected components, labelled 1..n largest
    first (others 0), and their sizes in voxels."""
    image = sitk.GetImageFromArray(mask.astype(np.uint8))
    relabel = sitk.RelabelComponentImageFilter()   # sorts by size, largest = 1
    labelled = sitk.GetArrayFromImage(relabel.Execute(sitk.ConnectedComponent(image, False)))
    sizes = np.array(relabel.GetSizeOfObjectsInPixels()[:count], int)
    labelled[labelled > count] = 0
    return labelled, sizes


def _body_mask(hu: np.ndarray) -> np.ndarray:
    body = hu > BODY_HU
    labelled, sizes = _largest_components(body, 1)
    if not len(sizes):
        raise SegmentationError("no tissue above -500 HU: is this a CT in Hounsfield units?")
    body = labelled == 1
    # Holes per axial slice: the lungs are enclosed by the chest wall in each slice,
    # while in 3D they may open to the outside through the airway at the top slice.
    filled = np.empty_like(body)
    for k in range(body.shape[0]):
        filled[k] = ndimage.binary_fill_holes(body[k])
    return filled


def _trachea_seed(air: np.ndarray, body: np.ndarray, spacing_zyx) -> tuple[int, int, int] | None:
    """A voxel inside the trachea: the highest slices' small, round, midline air region."""
    pixel_mm2 = spacing_zyx[1] * spacing_zyx[2]
    lo, hi = TRACHEA_AREA_MM2[0] / pixel_mm2, TRACHEA_AREA_MM2[1] / pixel_mm2
    zs = np.flatnonzero(air.any(axis=(1, 2)))
    if not len(zs):
        return None
    # Search the upper half of the air-containing slab, top slice first (LPS: +z superior).
    for k in range(zs[-1], int((zs[0] + zs[-1]) / 2), -1):
        body_x = np.flatnonzero(body[k].any(axis=0))
        if not len(body_x):
            continue
        mid_x = (body_x[0] + body_x[-1]) / 2.0
        labelled, n = ndimage.label(air[k])
        if n == 0:
            continue
        sizes = np.bincount(labelled.ravel())
        centres = ndimage.center_of_mass(air[k], labelled, range(1, n + 1))
        for index, (cy, cx) in enumerate(centres, start=1):
            if not lo <= sizes[index] <= hi:
                continue
            if abs(cx - mid_x) * spacing_zyx[2] > TRACHEA_MIDLINE_MM:
                continue
            region = labelled == index
            ys, xs = np.nonzero(region)
            extent = max(np.ptp(ys) + 1, np.ptp(xs) + 1)
            if sizes[index] < 0.4 * extent ** 2:       # round-ish, not a sliver of lung apex
                continue
            iy, ix = int(round(cy)), int(round(cx))
            if not region[iy, ix]:
                iy, ix = ys[len(ys) // 2], xs[len(xs) // 2]
            if not _continues_downwards(air, k, iy, ix, spacing_zyx):
                continue  # an air pocket (oesophagus, neck), not the trachea's tube
            return k, iy, ix
    return None


def _continues_downwards(air: np.ndarray, k: int, iy: int, ix: int, spacing_zyx,
                         length_mm: float = TRACHEA_MIN_LENGTH_MM) -> bool:
    """The trachea is a vertical tube: air near (iy, ix) in most slices of the next
    ``length_mm`` below slice k (LPS: lower index = inferior)."""
    n = max(2, int(round(length_mm / spacing_zyx[0])))
    reach = max(1, int(round(5.0 / spacing_zyx[1])))  # the tube may drift ~5 mm sideways
    below = air[max(0, k - n):k, max(0, iy - reach):iy + reach + 1, max(0, ix - reach):ix + reach + 1]
    return len(below) >= 2 and below.any(axis=(1, 2)).mean() >= 0.8


def _airway_mask(hu: np.ndarray, air: np.ndarray, seed, spacing_zyx) -> tuple[np.ndarray, float | None]:
    """Airway lumen grown from the seed: the brightest threshold whose tree stays small."""
    voxel_ml = float(np.prod(spacing_zyx)) / 1000.0
    image = sitk.GetImageFromArray(np.where(air, hu, 0.0).astype(np.float32))
    best, best_threshold = None, None
    seed_xyz = [int(seed[2]), int(seed[1]), int(seed[0])]
    for threshold in AIRWAY_THRESHOLDS_HU:
        if hu[seed] > threshold:
            continue
        grown = sitk.GetArrayFromImage(sitk.ConnectedThreshold(image, seedList=[seed_xyz],
                                                               lower=-3000.0, upper=threshold)) > 0
        if grown.sum() * voxel_ml > AIRWAY_LEAK_ML:
            break
        best, best_threshold = grown, threshold
    if best is None:
        return np.zeros_like(air), None
    # The wall of the lumen (partial-volume voxels) goes with the airway.
    best = ndimage.binary_dilation(best, _ball(np.full(3, 1.0))) & air
    return best, best_threshold


def _split_two(mask: np.ndarray, max_iterations: int = 12) -> np.ndarray | None:
    """Split one joined lung mask into two parts by erosion, then grow them back
    inside the mask (each voxel to the nearer part). None when no split appears."""
    eroded = mask.copy()
    structure = ndimage.generate_binary_structure(3, 1)
    for _ in range(max_iterations):
        eroded = ndimage.binary_erosion(eroded, structure)
        labelled, sizes = _largest_components(eroded, 2)
        if len(sizes) == 2 and sizes[1] > MIN_LUNG_FRACTION * sizes[0]:
            # Grow back: nearest seed voxel wins.
            _, (iz, iy, ix) = ndimage.distance_transform_edt(labelled == 0, return_indices=True)
            grown = labelled[iz, iy, ix]
            return np.where(mask, grown, 0).astype(np.int32)
    return None


def segment_lungs(hu: np.ndarray, spacing_zyx, air_hu: float = AIR_HU,
                  closing_mm: float = CLOSING_MM) -> tuple[np.ndarray, dict]:
    """Sides label array (1 right, 2 left) from a CT array in LPS voxel order (z, y, x; HU)."""
    spacing_zyx = np.asarray(spacing_zyx, float)
    body = _body_mask(hu)
    # Everything after this happens inside the body's bounding box (the table and
    # the outside air are often half of the image).
    box = tuple(slice(max(0, s.start - 1), s.stop + 1) for s in _bbox(body))
    sides = np.zeros(hu.shape, np.uint8)
    sides[box], details = _segment_in_body(hu[box], body[box], spacing_zyx, air_hu, closing_mm)
    if details["trachea_seed_zyx"] is not None:
        details["trachea_seed_zyx"] = [int(v + b.start) for v, b in zip(details["trachea_seed_zyx"], box)]
    return sides, details


def _bbox(mask: np.ndarray) -> tuple[slice, ...]:
    return tuple(slice(int(v[0]), int(v[-1]) + 1) for v in
                 (np.flatnonzero(mask.any(axis=a)) for a in ((1, 2), (0, 2), (0, 1))))


def _segment_in_body(hu, body, spacing_zyx, air_hu, closing_mm) -> tuple[np.ndarray, dict]:
    voxel_ml = float(np.prod(spacing_zyx)) / 1000.0
    air = (hu < air_hu) & body
    details: dict = {}
    seed = _trachea_seed(air, body, spacing_zyx)
    airway_threshold = None
    if seed is not None:
        airways, airway_threshold = _airway_mask(hu, air, seed, spacing_zyx)
        air &= ~airways
        details["airway_ml"] = round(float(airways.sum()) * voxel_ml, 1)
    details["trachea_seed_zyx"] = None if seed is None else [int(s) for s in seed]
    details["airway_threshold_hu"] = airway_threshold

    labelled, sizes = _largest_components(air, 3)
    if not len(sizes) or sizes[0] * voxel_ml < 100.0:
        raise SegmentationError(f"no lung-sized air region below {air_hu:.0f} HU inside the body "
                                f"(largest {sizes[0] * voxel_ml if len(sizes) else 0:.0f} mL)")
    keep = [i + 1 for i, s in enumerate(sizes[:2]) if s >= MIN_LUNG_FRACTION * sizes[0]]
    if len(keep) == 2:
        parts = np.where(np.isin(labelled, keep), labelled, 0)
        details["split"] = "components"
    else:
        parts = _split_two(labelled == 1)
        if parts is None:
            raise SegmentationError("found one lung region that could not be split into left and right")
        details["split"] = "erosion"

    # Sides by centre of mass along x (LPS: larger x = patient's left).
    centres_x = [np.nonzero(parts == p)[2].mean() for p in (1, 2)]
    left_part = 1 + int(np.argmax(centres_x))
    sides = np.zeros(hu.shape, np.uint8)
    radius = closing_mm / spacing_zyx
    for part, value in ((3 - left_part, LABELS.right_lung.value), (left_part, LABELS.left_lung.value)):
        lung = parts == part
        lung = _close(lung, radius)
        sides[lung & (sides == 0)] = value
    details["volume_ml"] = {"right": round(float((sides == 1).sum()) * voxel_ml, 1),
                            "left": round(float((sides == 2).sum()) * voxel_ml, 1)}
    return sides, details


def _close(mask: np.ndarray, radius_zyx) -> np.ndarray:
    """3D closing and hole filling on the mask's bounding box (fast, no edge effects)."""
    pad = np.ceil(radius_zyx).astype(int) + 1
    zs, ys, xs = (np.flatnonzero(mask.any(axis=a)) for a in ((1, 2), (0, 2), (0, 1)))
    box = tuple(slice(max(0, v[0] - p), min(n, v[-1] + p + 1))
                for v, p, n in zip((zs, ys, xs), pad, mask.shape))
    sub = np.pad(mask[box], [(p, p) for p in pad])
    closed = ndimage.binary_closing(sub, _ball(radius_zyx))
    closed = ndimage.binary_fill_holes(closed)
    out = np.zeros_like(mask)
    out[box] = closed[pad[0]:closed.shape[0] - pad[0], pad[1]:closed.shape[1] - pad[1], pad[2]:closed.shape[2] - pad[2]]
    return out
