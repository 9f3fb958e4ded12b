"""Seeded chest-CT phantoms with known truth: the demo cohort and a test fixture.

Each subject is the canonical phantom chest (the "atlas" frame) seen through a
per-subject pose, size and smooth random deformation. Because the mapping is
analytic, every subject comes with its exact ground truth: lobe labels, nodule
centres in both patient and atlas coordinates, and the patient -> atlas
displacement field.

Canonical frame: LPS millimetres (x to the patient's left, y posterior, z
superior), origin at the carina region. Anatomy (all analytic):
  body ellipse with a fat layer, ribs, two lungs with a diaphragm dome and the
  heart cut out, the right lung split by oblique and horizontal fissures into
  three lobes, the left by an oblique fissure into two, an airway tree, vessel-
  like tubes from band-passed noise, and spherical nodules.

The phantoms are for demonstrating and testing the pipeline; accuracy claims
on real anatomy come from the real CT under ../shared/data/ct.
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from .labels import LABELS

# Field of view of the canonical frame (mm, LPS): x, y, z extents.
FOV_MM = {"x": (-170.0, 170.0), "y": (-125.0, 125.0), "z": (-160.0, 160.0)}

HU = {"air": -1000.0, "lung": -860.0, "fat": -100.0, "soft": 40.0, "blood": 45.0,
      "bone": 650.0, "airway_wall": 60.0, "nodule": 20.0}

# Relative chance of a nodule landing in each lobe, per mL of lobe. Upper lobes
# (right upper above all) are over-represented, as in screening cohorts.
LOBE_NODULE_WEIGHT = {1: 1.8, 2: 0.8, 3: 0.8, 4: 1.3, 5: 0.8}


@dataclass
class Nodule:
    nodule_id: str
    lobe: int
    diameter_mm: float
    centre_patient_lps: tuple[float, float, float]
    centre_atlas_lps: tuple[float, float, float]


@dataclass
class PhantomSubject:
    """One synthetic scan with its truth. ``patient_to_atlas`` is a displacement
    field on the CT grid: atlas point = p + u(p) for a patient point p (the
    transform ITK uses to resample an atlas image onto this patient's grid)."""

    subject_id: str
    ct: sitk.Image
    labels: sitk.Image
    nodules: list[Nodule]
    patient_to_atlas: sitk.Image
    metadata: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------
# Canonical anatomy (functions of canonical coordinates X, Y, Z in mm)
# ---------------------------------------------------------------------------
def _lung_side_masks(X, Y, Z):
    """Right and left lung masks (before airway/vessel detail)."""
    masks = {}
    for side, cx in (("right", -72.0), ("left", 72.0)):
        rx = 58.0 if side == "right" else 54.0
        inside = ((X - cx) / rx) ** 2 + ((Y - 5.0) / 82.0) ** 2 + ((Z - 5.0) / 118.0) ** 2 < 1.0
        # Diaphragm dome: the lung base rises towards the middle of each hemithorax
        # (the right dome sits higher, over the liver).
        dome_top = -70.0 + (12.0 if side == "right" else 0.0)
        dome = dome_top - 45.0 * (((X - cx) / 70.0) ** 2 + ((Y - 10.0) / 90.0) ** 2)
        inside &= Z > dome
        # Mediastinum keeps the lungs apart
        inside &= np.abs(X) > 22.0
        masks[side] = inside
    # Heart: anterior, inferior, towards the left; it indents the left lung most.
    heart = ((X - 25.0) / 70.0) ** 2 + ((Y + 30.0) / 60.0) ** 2 + ((Z + 45.0) / 65.0) ** 2 < 1.0
    masks["right"] &= ~heart
    masks["left"] &= ~heart
    return masks, heart


def _lobe_labels(X, Y, Z, lung_masks, fissure_wobble):
    """Split the lungs into lobes by fissure surfaces (z as a function of y).

    Oblique fissure: high posteriorly, low anteriorly (lower lobe behind and below).
    Horizontal fissure (right only): roughly level, separating upper from middle.
    """
    wobble = fissure_wobble
    labels = np.zeros(X.shape, np.uint8)
    oblique_right = 5.0 + 0.85 * Y + wobble[0] * np.sin(X / 25.0)
    oblique_left = 15.0 + 0.9 * Y + wobble[1] * np.sin(X / 30.0 + 1.0)
    horizontal = 25.0 + 0.12 * Y + wobble[2] * np.cos(X / 20.0)
    right, left = lung_masks["right"], lung_masks["left"]
    lower_r = right & (Z < oblique_right)
    upper_r = right & ~lower_r & (Z >= horizontal)
    middle_r = right & ~lower_r & (Z < horizontal)
    lower_l = left & (Z < oblique_left)
    upper_l = left & ~lower_l
    labels[upper_r] = 1
    labels[middle_r] = 2
    labels[lower_r] = 3
    labels[upper_l] = 4
    labels[lower_l] = 5
    return labels


def _segment_distance(P, a, b):
    """Distance (mm) from points P (..., 3) to the segment a-b."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    ab = b - a
    t = np.clip(((P - a) @ ab) / float(ab @ ab), 0.0, 1.0)
    closest = a + t[..., None] * ab
    return np.linalg.norm(P - closest, axis=-1)


AIRWAY_SEGMENTS = [  # (start, end, radius mm) in the canonical frame
    ((0.0, -25.0, 140.0), (0.0, -20.0, 45.0), 9.0),     # trachea
    ((0.0, -20.0, 45.0), (-45.0, -10.0, 25.0), 6.5),    # right main bronchus
    ((0.0, -20.0, 45.0), (45.0, -8.0, 20.0), 6.0),      # left main bronchus
    ((-45.0, -10.0, 25.0), (-75.0, -5.0, 80.0), 4.0),   # right upper lobe bronchus
    ((-45.0, -10.0, 25.0), (-70.0, -45.0, -5.0), 3.5),  # right middle lobe bronchus
    ((-45.0, -10.0, 25.0), (-80.0, 35.0, -40.0), 4.0),  # right lower lobe bronchus
    ((45.0, -8.0, 20.0), (75.0, -15.0, 75.0), 4.0),     # left upper lobe bronchus
    ((45.0, -8.0, 20.0), (78.0, 35.0, -35.0), 4.0),     # left lower lobe bronchus
]


def _airways(P):
    lumen = np.zeros(P.shape[:-1], bool)
    wall = np.zeros(P.shape[:-1], bool)
    for a, b, radius in AIRWAY_SEGMENTS:
        d = _segment_distance(P, a, b)
        lumen |= d < radius
        wall |= d < radius + 1.5
    return lumen, wall & ~lumen


def _ribs(X, Y, Z):
    """Rib-like bone: thin elliptical bands in the chest wall, every ~28 mm."""
    r = np.sqrt((X / 150.0) ** 2 + (Y / 105.0) ** 2)
    band = np.abs(r - 0.93) < 0.035
    phase = np.mod(Z + 0.25 * Y + 150.0, 28.0)
    return band & (phase < 9.0) & (Z > -120.0) & (Z < 125.0)


class _CanonicalTexture:
    """Band-passed noise volumes on a fixed canonical grid: the intersection of
    two near-zero level sets gives branching tube-like 'vessels'."""

    def __init__(self, seed: int, spacing: float = 2.0):
        rng = np.random.default_rng(seed)
        self.spacing = spacing
        self.origin = np.array([FOV_MM["z"][0], FOV_MM["y"][0], FOV_MM["x"][0]])
        shape = tuple(int((hi - lo) / spacing) + 1 for lo, hi in (FOV_MM["z"], FOV_MM["y"], FOV_MM["x"]))
        fields = []
        for _ in range(2):
            noise = rng.standard_normal(shape).astype(np.float32)
            smooth = ndimage.gaussian_filter(noise, 3.0)
            smooth /= smooth.std() + 1e-6
            fields.append(smooth)
        self.fields = fields
        speckle = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), 1.0)
        self.speckle = speckle / (speckle.std() + 1e-6)

    def sample(self, volume, X, Y, Z):
        coords = np.stack([(Z - self.origin[0]) / self.spacing, (Y - self.origin[1]) / self.spacing,
                           (X - self.origin[2]) / self.spacing])
        return ndimage.map_coordinates(volume, coords.reshape(3, -1), order=1, mode="nearest").reshape(X.shape)


# ---------------------------------------------------------------------------
# Per-subject mapping: patient point p -> canonical (atlas) point
# ---------------------------------------------------------------------------
@dataclass
class _SubjectMapping:
    """atlas(p) = A (p + d(p)) + t with A a scaled rotation about the origin and
    d a smooth sum of Gaussian displacement bumps (patient frame)."""

    matrix: np.ndarray          # 3x3, patient -> atlas linear part
    translation: np.ndarray     # mm
    bump_centres: np.ndarray    # (K, 3) mm
    bump_vectors: np.ndarray    # (K, 3) mm
    bump_width: float           # mm

    def local_displacement(self, P):
        d = np.zeros_like(P)
        for centre, vector in zip(self.bump_centres, self.bump_vectors):
            weight = np.exp(-np.sum((P - centre) ** 2, axis=-1) / (2.0 * self.bump_width ** 2))
            d += weight[..., None] * vector
        return d

    def to_atlas(self, P):
        return (P + self.local_displacement(P)) @ self.matrix.T + self.translation

    def to_patient(self, Q, iterations: int = 60):
        """Invert to_atlas by fixed-point iteration (converges: |grad d| < 1)."""
        target = (np.asarray(Q, float) - self.translation) @ np.linalg.inv(self.matrix).T
        P = target.copy()
        for _ in range(iterations):
            P = target - self.local_displacement(P)
        return P


def _rotation(rx, ry, rz):
    cx, sx, cy, sy, cz, sz = np.cos(rx), np.sin(rx), np.cos(ry), np.sin(ry), np.cos(rz), np.sin(rz)
    Rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    Ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    Rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return Rz @ Ry @ Rx


def _subject_mapping(rng: np.random.Generator, variation: float) -> _SubjectMapping:
    """``variation`` 0 gives the identity (the atlas subject itself)."""
    scale = 1.0 + variation * rng.uniform(-0.12, 0.12, 3)   # lung size: +-12 % per axis
    angles = np.deg2rad(variation * rng.uniform(-8.0, 8.0, 3))
    matrix = _rotation(*angles) @ np.diag(1.0 / scale)      # atlas = R S^-1 patient
    translation = variation * rng.uniform(-20.0, 20.0, 3)
    k = 6
    centres = np.column_stack([rng.uniform(-110, 110, k), rng.uniform(-70, 70, k), rng.uniform(-90, 90, k)])
    vectors = variation * rng.normal(0.0, 7.0, (k, 3))       # mm
    return _SubjectMapping(matrix, translation, centres, vectors, bump_width=45.0)


def _displacement_image(reference: sitk.Image, displacement_xyz: np.ndarray) -> sitk.Image:
    field_image = sitk.GetImageFromArray(displacement_xyz.astype(np.float64), isVector=True)
    field_image.CopyInformation(reference)
    return field_image


# ---------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------
def make_subject(seed: int, spacing_mm: float = 3.0, variation: float = 1.0, n_nodules: int | None = None,
                 subject_id: str | None = None, noise_hu: float = 25.0) -> PhantomSubject:
    """One phantom chest CT with truth. ``variation=0`` gives the canonical atlas subject."""
    rng = np.random.default_rng(seed)
    mapping = _subject_mapping(rng, variation)
    fissure_wobble = variation * rng.uniform(-6.0, 6.0, 3)

    # Patient grid: the canonical field of view, shifted with the subject's pose.
    lo = np.array([FOV_MM["x"][0], FOV_MM["y"][0], FOV_MM["z"][0]])
    hi = np.array([FOV_MM["x"][1], FOV_MM["y"][1], FOV_MM["z"][1]])
    size = np.round((hi - lo) / spacing_mm).astype(int) + 1
    origin = lo - mapping.translation * 0.5
    reference = sitk.Image([int(s) for s in size], sitk.sitkInt16)
    reference.SetSpacing([spacing_mm] * 3)
    reference.SetOrigin(tuple(float(o) for o in origin))

    zz, yy, xx = np.meshgrid(*(np.arange(n) for n in size[::-1]), indexing="ij")
    P = np.stack([origin[0] + xx * spacing_mm, origin[1] + yy * spacing_mm, origin[2] + zz * spacing_mm], axis=-1)
    Q = mapping.to_atlas(P)
    X, Y, Z = Q[..., 0], Q[..., 1], Q[..., 2]

    texture = _CanonicalTexture(seed + 7919)
    body = (X / 165.0) ** 2 + (Y / 118.0) ** 2 < 1.0
    body &= (Z > FOV_MM["z"][0] + 5) & (Z < FOV_MM["z"][1] - 5)
    muscle = (X / 150.0) ** 2 + (Y / 105.0) ** 2 < 1.0
    lung_masks, heart = _lung_side_masks(X, Y, Z)
    lumen, airway_wall = _airways(Q)
    lobes = _lobe_labels(X, Y, Z, lung_masks, fissure_wobble)

    v1 = texture.sample(texture.fields[0], X, Y, Z)
    v2 = texture.sample(texture.fields[1], X, Y, Z)
    vessels = (np.abs(v1) < 0.18) & (np.abs(v2) < 0.18)
    lung_any = lobes > 0

    ct = np.full(X.shape, HU["air"], np.float32)
    ct[body] = HU["fat"]
    ct[body & muscle] = HU["soft"]
    ct[heart & body] = HU["blood"]
    ct[_ribs(X, Y, Z) & body] = HU["bone"]
    ct[lung_any] = HU["lung"] + 30.0 * texture.sample(texture.speckle, X, Y, Z)[lung_any]
    ct[lung_any & vessels] = HU["blood"]
    ct[airway_wall & body & ~lung_any] = HU["airway_wall"]
    ct[airway_wall & lung_any] = HU["airway_wall"]
    ct[lumen] = HU["air"]
    lobes[lumen] = 0  # airways are not lung parenchyma

    # Nodules: positions drawn in the atlas frame, weighted per lobe, then mapped to the patient.
    nodules = []
    count = int(rng.integers(0, 4)) if n_nodules is None else int(n_nodules)
    canonical = _canonical_lobes_cache(spacing=4.0)
    for index in range(count):
        lobe = int(rng.choice(list(LOBE_NODULE_WEIGHT), p=_lobe_probabilities(canonical)))
        candidates = canonical["points"][canonical["labels"] == lobe]
        centre_atlas = candidates[rng.integers(len(candidates))] + rng.uniform(-1.5, 1.5, 3)
        diameter = float(rng.uniform(4.0, 14.0))
        centre_patient = mapping.to_patient(centre_atlas[None, :])[0]
        inside = np.sum((P - centre_patient) ** 2, axis=-1) < (diameter / 2.0) ** 2
        ct[inside] = HU["nodule"]
        nodules.append(Nodule(f"{subject_id or seed}-n{index + 1}", lobe, diameter,
                              tuple(float(c) for c in centre_patient), tuple(float(c) for c in centre_atlas)))

    if noise_hu > 0:
        ct += rng.normal(0.0, noise_hu, ct.shape).astype(np.float32)
    ct = ndimage.gaussian_filter(ct, 0.5)
    ct_image = sitk.GetImageFromArray(np.clip(np.round(ct), -1024, 3071).astype(np.int16))
    ct_image.CopyInformation(reference)
    label_image = sitk.GetImageFromArray(lobes)
    label_image.CopyInformation(reference)
    field_image = _displacement_image(reference, Q - P)

    sid = subject_id or f"phantom{seed:04d}"
    metadata = {"subject_id": sid, "seed": seed, "spacing_mm": spacing_mm, "variation": variation,
                "lung_volume_ml": float(lung_any.sum() * spacing_mm ** 3 / 1000.0)}
    return PhantomSubject(sid, ct_image, label_image, nodules, field_image, metadata)


_CANONICAL_CACHE: dict = {}


def _canonical_lobes_cache(spacing: float) -> dict:
    """Lobe labels of the canonical frame sampled on a coarse grid (for drawing nodule sites)."""
    if spacing not in _CANONICAL_CACHE:
        axes = [np.arange(lo, hi, spacing) for lo, hi in (FOV_MM["x"], FOV_MM["y"], FOV_MM["z"])]
        X, Y, Z = np.meshgrid(*axes, indexing="ij")
        masks, _ = _lung_side_masks(X, Y, Z)
        labels = _lobe_labels(X, Y, Z, masks, np.zeros(3))
        # Keep nodules off the lung edge: only sites 2 voxels inside their lobe
        interior = np.zeros_like(labels)
        for lobe in LABELS.lobe_values:
            interior[ndimage.binary_erosion(labels == lobe, iterations=2)] = lobe
        points = np.stack([X, Y, Z], axis=-1)
        _CANONICAL_CACHE[spacing] = {"points": points.reshape(-1, 3), "labels": interior.ravel()}
    return _CANONICAL_CACHE[spacing]


def _lobe_probabilities(canonical: dict) -> np.ndarray:
    volumes = np.array([(canonical["labels"] == lobe).sum() for lobe in LOBE_NODULE_WEIGHT], float)
    weights = volumes * np.array(list(LOBE_NODULE_WEIGHT.values()))
    return weights / weights.sum()


def make_atlas_subject(spacing_mm: float = 3.0) -> PhantomSubject:
    """The canonical phantom itself (no deformation, no nodules): the demo's template."""
    return make_subject(seed=0, spacing_mm=spacing_mm, variation=0.0, n_nodules=0, subject_id="atlas")


def subject_phenotype(seed: int) -> dict:
    """Seeded NLST-like phenotype for a demo subject (age, sex, smoking, pack-years, cancer)."""
    rng = np.random.default_rng(10_000 + seed)
    return {"age": int(rng.integers(55, 75)), "gender": int(rng.integers(1, 3)),
            "cigsmok": int(rng.integers(0, 2)), "pkyr": float(np.round(rng.uniform(30, 90), 1)),
            "can_scr": int(rng.random() < 0.1)}


def write_subject(subject: PhantomSubject, folder: str | Path) -> dict:
    """Write CT, labels, truth field and nodules to ``folder``; returns the paths."""
    from .io import write_image

    folder = Path(folder)
    paths = {
        "ct": write_image(subject.ct, folder / "ct.nii.gz"),
        "labels": write_image(subject.labels, folder / "lobes_truth.nii.gz"),
        "truth_patient_to_atlas": write_image(subject.patient_to_atlas, folder / "truth_patient_to_atlas.nii.gz"),
    }
    nodule_path = folder / "nodules_truth.csv"
    with open(nodule_path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["nodule_id", "lobe", "diameter_mm", "x_lps", "y_lps", "z_lps",
                         "atlas_x_lps", "atlas_y_lps", "atlas_z_lps"])
        for n in subject.nodules:
            writer.writerow([n.nodule_id, n.lobe, f"{n.diameter_mm:.2f}", *(f"{c:.3f}" for c in n.centre_patient_lps),
                             *(f"{c:.3f}" for c in n.centre_atlas_lps)])
    paths["nodules"] = nodule_path
    (folder / "subject.json").write_text(json.dumps(subject.metadata, indent=1))
    return {k: str(v) for k, v in paths.items()}
