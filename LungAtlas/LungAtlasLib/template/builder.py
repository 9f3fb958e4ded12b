"""Groupwise template (atlas) building: unbiased average shape and intensity of N chest CTs.

The method of ANTs' template construction and of uniGradICON's atlas builder:

1. reference: the medoid, i.e. the case whose lungs overlap the others best after
   centroid alignment (lung-mask Dice on a coarse grid), unless one is chosen;
2. template grid: the reference's field of view at ``spacing_mm``;
3. K rounds: register every case (moving) to the current template (fixed) with the
   chosen backend; warp CTs (linear) and lobe indicators (linear -> probabilities)
   onto the template grid; average; then the shape update: with u_i the
   template -> case displacement of case i and mean map m(x) = x + mean_i u_i(x),
   the new template is the average resampled through m^-1, so that each anatomical
   point moves to its mean position over the cases (the mean displacement to the
   cases tends to zero: the template is unbiased);
4. lobe labels by majority vote (argmax of the probability maps, background
   included), then written as an atlas bundle (:func:`write_atlas`).

Cases run one after another through ``map_fn`` (default: built-in ``map``); pass an
executor's map to run them in parallel.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import SimpleITK as sitk

from .. import geometry
from ..labels import LABELS
from ..registration import get_registration
from ..registration.transforms import displacement_field, warp_image, warp_labels

log = logging.getLogger(__name__)


@dataclass
class TemplateCase:
    """One input scan: CT (HU) and its label map (lobes 1-5, or lungs > 0) on the CT's grid."""

    case_id: str
    ct: sitk.Image
    labels: sitk.Image
    source: dict = field(default_factory=dict)  # file paths, for provenance


@dataclass
class TemplateResult:
    ct: sitk.Image                       # Float32 HU on the template grid
    labels: sitk.Image                   # UInt8 majority-vote labels
    probabilities: dict[int, sitk.Image]  # label value -> Float32 [0, 1]
    rounds: list[dict]                   # per-round convergence figures
    reference: str
    provenance: dict


def lung_mask(labels: sitk.Image) -> sitk.Image:
    return sitk.Cast(sitk.NotEqual(labels, 0), sitk.sitkUInt8)


def choose_medoid(cases: list[TemplateCase], spacing_mm: float = 8.0) -> tuple[str, np.ndarray]:
    """The case with the highest mean lung Dice to the others after centroid alignment
    (lung masks on an isotropic ``spacing_mm`` grid); returns its id and the Dice matrix."""
    from ..registration.classical import centroid

    masks = [geometry.resample_isotropic(lung_mask(c.labels), spacing_mm, is_label=True) for c in cases]
    centres = [centroid(m) for m in masks]
    n = len(cases)
    scores = np.eye(n)
    for i in range(n):
        for j in range(i + 1, n):
            shift = sitk.TranslationTransform(3, tuple(float(v) for v in centres[j] - centres[i]))
            moved = sitk.Resample(masks[j], masks[i], shift, sitk.sitkNearestNeighbor, 0)
            a = sitk.GetArrayViewFromImage(masks[i]) > 0
            b = sitk.GetArrayViewFromImage(moved) > 0
            scores[i, j] = scores[j, i] = 2.0 * (a & b).sum() / max(1, a.sum() + b.sum())
    mean = (scores.sum(axis=1) - 1.0) / max(1, n - 1)
    return cases[int(np.argmax(mean))].case_id, scores


def _template_grid(reference: TemplateCase, spacing_mm: float | None, margin_mm: float) -> sitk.Image:
    """The reference's lung box (+ margin) at ``spacing_mm`` (default: the reference's spacing)."""
    box = geometry.bounding_box(sitk.GetArrayViewFromImage(reference.labels) > 0,
                                int(np.ceil(margin_mm / min(reference.ct.GetSpacing()))))
    cropped = geometry.crop(reference.ct, box)
    if spacing_mm:
        return geometry.isotropic_grid(cropped, spacing_mm)
    return cropped


def _label_values(cases: list[TemplateCase]) -> list[int]:
    values = set()
    for case in cases:
        values.update(int(v) for v in np.unique(sitk.GetArrayViewFromImage(case.labels)) if v != 0)
    return sorted(values)


def _warp_case(args):
    """Register one case to the template and return its warped CT, label indicators and displacement."""
    backend, template_ct, template_labels, case, values = args
    result = backend.register(template_ct, case.ct, fixed_mask=lung_mask(template_labels),
                              moving_mask=lung_mask(case.labels))
    ct = sitk.GetArrayFromImage(warp_image(case.ct, template_ct, result.fixed_to_moving, pixel_type=sitk.sitkFloat32))
    indicators = {}
    for value in values:
        indicator = sitk.Cast(sitk.Equal(case.labels, value), sitk.sitkFloat32)
        indicators[value] = sitk.GetArrayFromImage(
            sitk.Resample(indicator, template_ct, result.fixed_to_moving, sitk.sitkLinear, 0.0, sitk.sitkFloat32))
    displacement = sitk.GetArrayFromImage(displacement_field(result.fixed_to_moving, template_ct))
    nearest = sitk.GetArrayFromImage(warp_labels(case.labels, template_ct, result.fixed_to_moving))
    return {"ct": ct, "indicators": indicators, "displacement": displacement, "labels": nearest,
            "info": {k: result.info.get(k) for k in ("timings", "lung_dice_working_grid", "qc") if k in result.info}}


def _majority(probabilities: dict[int, np.ndarray]) -> np.ndarray:
    values = sorted(probabilities)
    stack = np.stack([1.0 - np.sum([probabilities[v] for v in values], axis=0)] + [probabilities[v] for v in values])
    return np.array([0] + values, np.uint8)[np.argmax(stack, axis=0)]


def _image(array: np.ndarray, reference: sitk.Image, is_vector: bool = False) -> sitk.Image:
    image = sitk.GetImageFromArray(array, isVector=is_vector)
    image.CopyInformation(reference)
    return image


def build_template(cases: list[TemplateCase], backend: str = "classical", backend_options: dict | None = None,
                   rounds: int = 3, reference: str | None = None, spacing_mm: float | None = 2.0,
                   margin_mm: float = 20.0, map_fn: Callable = map) -> TemplateResult:
    """Build a template from ``cases`` (see the module docstring). ``spacing_mm`` is the
    template's voxel size (None: the reference's spacing); ``rounds`` >= 1."""
    if len(cases) < 2:
        raise ValueError(f"a template needs at least 2 cases, got {len(cases)}")
    if rounds < 1:
        raise ValueError("rounds must be >= 1")
    ids = [c.case_id for c in cases]
    if len(set(ids)) != len(ids):
        raise ValueError("case ids must be unique")
    for case in cases:
        if not sitk.GetArrayViewFromImage(case.labels).any():
            raise ValueError(f"case {case.case_id}: its label map is empty (no lungs)")
        if not geometry.same_grid(case.labels, case.ct, tolerance=1e-3):
            raise ValueError(f"case {case.case_id}: labels and CT are on different grids")
    started = time.perf_counter()
    dice_matrix = None
    if reference is None:
        reference, dice_matrix = choose_medoid(cases)
    elif reference not in ids:
        raise ValueError(f"reference {reference!r} is not one of the cases")
    reference_case = cases[ids.index(reference)]
    values = _label_values(cases)
    registration = get_registration(backend, **(backend_options or {}))
    registration.check_ready()

    grid = _template_grid(reference_case, spacing_mm, margin_mm)
    template_ct = warp_image(reference_case.ct, grid, sitk.Transform(), pixel_type=sitk.sitkFloat32)
    template_labels = warp_labels(reference_case.labels, grid, sitk.Transform())
    history = []
    probabilities = {}
    for round_index in range(1, rounds + 1):
        t0 = time.perf_counter()
        outputs = list(map_fn(_warp_case, [(registration, template_ct, template_labels, c, values) for c in cases]))
        mean_ct = np.mean([o["ct"] for o in outputs], axis=0)
        mean_prob = {v: np.mean([o["indicators"][v] for o in outputs], axis=0) for v in values}
        mean_disp = np.mean([o["displacement"] for o in outputs], axis=0)
        lungs = _majority(mean_prob) > 0
        # Convergence figures before the shape update: how far the cases sit from the template
        # on average (bias), and how well each case's lungs/lobes overlap the template's.
        from ..metrics import dice_per_label
        fixed_labels = sitk.GetArrayViewFromImage(template_labels)
        case_dice = [dice_per_label(fixed_labels, o["labels"], values) for o in outputs]
        bias = np.linalg.norm(mean_disp, axis=-1)[lungs]
        inverse_mean = sitk.DisplacementFieldTransform(
            sitk.InvertDisplacementField(_image(mean_disp.astype(np.float64), grid, is_vector=True),
                                         maximumNumberOfIterations=20, maxErrorToleranceThreshold=0.01,
                                         meanErrorToleranceThreshold=0.0001, enforceBoundaryCondition=True))
        # shape update: average resampled through the inverse mean map
        new_ct = sitk.Resample(_image(mean_ct.astype(np.float32), grid), grid, inverse_mean, sitk.sitkLinear,
                               geometry.AIR_HU, sitk.sitkFloat32)
        probabilities = {v: sitk.Resample(_image(p.astype(np.float32), grid), grid, inverse_mean, sitk.sitkLinear,
                                          0.0, sitk.sitkFloat32) for v, p in mean_prob.items()}
        change = float(np.sqrt(np.mean((sitk.GetArrayViewFromImage(new_ct) - sitk.GetArrayViewFromImage(template_ct)) ** 2)))
        template_ct = new_ct
        template_labels = _image(_majority({v: sitk.GetArrayFromImage(p) for v, p in probabilities.items()}), grid)
        row = {
            "round": round_index,
            "mean_displacement_mm": float(bias.mean()) if bias.size else float("nan"),
            "max_mean_displacement_mm": float(bias.max()) if bias.size else float("nan"),
            "mean_lung_dice_to_template": float(np.nanmean([d["lung"] for d in case_dice])),
            "mean_label_dice_to_template": float(np.nanmean([np.nanmean([d[v] for v in values]) for d in case_dice])),
            "template_rms_change_hu": change,
            "seconds": time.perf_counter() - t0,
        }
        history.append(row)
        log.info("template round %d: mean displacement %.2f mm, lung Dice %.3f, label Dice %.3f, change %.1f HU",
                 round_index, row["mean_displacement_mm"], row["mean_lung_dice_to_template"],
                 row["mean_label_dice_to_template"], change)

    provenance = {
        "inputs": [{"case_id": c.case_id, **c.source} for c in cases],
        "reference": reference,
        "reference_choice": "given" if dice_matrix is None else "medoid by centroid-aligned lung Dice (8 mm)",
        "parameters": {"backend": backend, "backend_options": backend_options or {}, "rounds": rounds,
                       "spacing_mm": spacing_mm, "margin_mm": margin_mm, "labels": values},
        "backend_info": getattr(registration, "_weights_info", None),
        "versions": _versions(),
        "seconds": time.perf_counter() - started,
    }
    return TemplateResult(template_ct, template_labels, probabilities, history, reference, provenance)


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for dist in ("lungatlas", "SimpleITK", "numpy", "antspyx", "unigradicon", "icon-registration", "torch", "itk"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            pass
    return out


def write_atlas(result: TemplateResult, folder: str | Path) -> dict[str, str]:
    """Write the atlas bundle: template_ct.nii.gz, template_labels.nii.gz,
    probability_<label>.nii.gz per label, atlas.json (provenance and per-round figures)."""
    from ..io import write_image
    from ..paths import write_json_atomic

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"template_ct": write_image(result.ct, folder / "template_ct.nii.gz"),
             "template_labels": write_image(result.labels, folder / "template_labels.nii.gz")}
    for value, image in result.probabilities.items():
        try:
            key = LABELS.lobe(value).key
        except (KeyError, ValueError, IndexError):
            key = f"label{value}"
        paths[f"probability_{key}"] = write_image(image, folder / f"probability_{key}.nii.gz")
    paths = {k: str(Path(v).name) for k, v in paths.items()}
    write_json_atomic(folder / "atlas.json", {"kind": "lungatlas-template", "files": paths,
                                              "rounds": result.rounds, **result.provenance})
    return paths


def warp_atlas(atlas_folder: str | Path, case_ct: sitk.Image, moving_to_fixed: sitk.Transform,
               out_folder: str | Path) -> dict[str, str]:
    """Bring a whole atlas bundle onto one case's grid (atlas = fixed, case = moving).

    ``moving_to_fixed`` maps case points to atlas points, which is exactly the
    resampling transform that pulls atlas images onto the case grid. The template CT
    and probability maps are resampled linearly, the label map by nearest neighbour;
    file names are kept. Returns the written paths by file key of atlas.json."""
    from ..io import read_image, write_image
    from ..paths import read_json, write_json_atomic

    atlas_folder, out_folder = Path(atlas_folder), Path(out_folder)
    manifest = atlas_folder / "atlas.json"
    if not manifest.is_file():
        raise FileNotFoundError(f"{manifest} not found: {atlas_folder} is not an atlas bundle")
    atlas = read_json(manifest)
    written = {}
    for key, name in atlas["files"].items():
        image = read_image(atlas_folder / name, require_ct=False)  # a broken file is named
        if key == "template_labels":
            warped = warp_labels(image, case_ct, moving_to_fixed)
        else:
            default = geometry.AIR_HU if key == "template_ct" else 0.0
            warped = warp_image(image, case_ct, moving_to_fixed, default_value=default)
        written[key] = str(write_image(warped, out_folder / name))
    write_json_atomic(out_folder / "warped_atlas.json", {"atlas": str(atlas_folder), "files": written})
    return written
