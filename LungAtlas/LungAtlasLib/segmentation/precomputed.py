"""Existing segmentations: label maps, Slicer ``.seg.nrrd`` files and DICOM SEG.

Reuses segmentations made elsewhere, e.g. the TotalSegmentator results that NCI
Imaging Data Commons publishes for NLST as DICOM SEG, instead of recomputing
them. Whatever the source, the result is a label map on the CT's grid (nearest
neighbour resampling in physical LPS space) with the label table's values.

Three sources, told apart by the file:

- label map (NIfTI, NRRD, MHA): values translated by ``code_map``: "totalsegmentator"
  (the ``total`` task's 117 classes, of which 10-14 are the lobes), "lungatlas"
  (values already 1-5, or 1-2 with ``kind="sides"``), or a dict {code: value}.
  A code that the map does not know is an error, never silently dropped.
- Slicer segmentation (``.seg.nrrd``): segments matched by name (``Segment<i>_Name``,
  and the terminology entry) to lobes or lung sides, one or several layers.
- DICOM SEG (a ``.dcm`` file, or a folder holding one SEG object): read with
  highdicom; segments matched by label / description and by their segmented
  property type and anatomic region modifier (e.g. SNOMED "Upper lobe of lung" +
  "Left"). With ``series_uid`` set, a SEG that references another series is an error.

Segment name matching (:func:`match_region`) understands the label table's names,
Slicer's terminology names ("right upper lobe of lung"), TotalSegmentator's
("lung_upper_lobe_right") and coded meanings; ``segment_names`` adds explicit
{name: value} pairs for anything else.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .. import geometry, io
from ..labels import LABELS
from .base import SegmentationError, SegmentationResult, Segmenter
from .qc import quality_control

# A segmentation that keeps less than this fraction of its labelled voxels after
# resampling onto the CT lies mostly outside the CT: it belongs to another scan.
MIN_KEPT_FRACTION = 0.5
TOTALSEGMENTATOR_MAX_CODE = 117  # task "total" classes are 1..117


def _named_code_maps() -> dict[str, dict[int, int]]:
    return {
        "totalsegmentator": {code: LABELS.totalsegmentator_to_lobe.get(code, 0)
                             for code in range(1, TOTALSEGMENTATOR_MAX_CODE + 1)},
        "lungatlas": {v: v for v in LABELS.lobe_values},
    }


def parse_code_map(spec) -> dict[int, int] | str | None:
    """``None``, a name ("totalsegmentator", "lungatlas"), a dict, or text "10:4,11:5,..." -> map."""
    if spec is None or isinstance(spec, dict):
        return spec
    text = str(spec).strip()
    if text.lower() in _named_code_maps():
        return text.lower()
    try:
        pairs = [item.split(":") for item in re.split(r"[,\s]+", text) if item]
        return {int(src): int(dst) for src, dst in pairs}
    except ValueError:
        raise SegmentationError(f"code map {spec!r}: use 'totalsegmentator', 'lungatlas' or pairs "
                                "like '10:4,11:5,12:1,13:2,14:3' (source code: LungAtlas value)") from None


# Structures named after a lobe or lung that are not its parenchyma ("left upper lobe
# bronchus", "lung_vessels", "right lung nodule").
_NOT_PARENCHYMA = {"bronchus", "bronchi", "bronchial", "vessel", "vessels", "artery", "arteries", "vein", "veins",
                   "nodule", "nodules", "tumor", "tumour", "lesion", "mass", "effusion", "airway", "airways",
                   "trachea", "fissure"}


def match_region(text: str) -> tuple[str, int] | None:
    """("lobes", 1-5) or ("sides", 1 right / 2 left) for a segment name or coded meaning; None otherwise."""
    words = set(re.sub(r"[^a-z]+", " ", str(text).lower().replace("_", " ")).split())
    sides = words & {"left", "right"}
    if len(sides) != 1 or not ({"lung", "lobe"} & words) or words & _NOT_PARENCHYMA:
        return None
    side = sides.pop()
    levels = words & {"upper", "middle", "lower", "superior", "inferior"}
    if not levels:
        if "lung" in words and "lingula" not in words:
            return "sides", (LABELS.right_lung.value if side == "right" else LABELS.left_lung.value)
        return None
    if len(levels) != 1:
        return None
    level = {"superior": "upper", "inferior": "lower"}.get(next(iter(levels)), next(iter(levels)))
    key = f"{side}_{level}"
    try:
        return "lobes", LABELS.lobe(key).value
    except KeyError:          # e.g. a "left middle lobe": not an anatomical lobe
        return None


class PrecomputedSegmenter(Segmenter):
    """Reads an existing segmentation for the case.

    Options:
      path: the segmentation file or folder; ``{case_id}`` in it is replaced by the case id
        (so one segmenter serves a cohort: ``path="/segs/{case_id}.seg.nrrd"``);
      code_map: for label maps: "totalsegmentator" (default), "lungatlas" or {code: value};
      kind: "lobes" (default) or "sides" for label maps; segment files decide it themselves;
      segment_names: {segment name: LungAtlas value} added to the built-in name matching;
      series_uid: the CT's DICOM SeriesInstanceUID; a DICOM SEG referencing another series is refused;
      require_same_grid: refuse (instead of resampling) a label map on another grid (default False).
    """

    name = "precomputed"

    def __init__(self, path=None, code_map="totalsegmentator", kind: str = "lobes", segment_names=None,
                 series_uid: str | None = None, require_same_grid: bool = False):
        if path is None:
            raise SegmentationError("the precomputed backend needs path= (the segmentation file; "
                                    "'{case_id}' in it is replaced by the case id)")
        if kind not in ("lobes", "sides"):
            raise SegmentationError(f"kind must be 'lobes' or 'sides', not {kind!r}")
        self.path = str(path)
        self.code_map = parse_code_map(code_map)
        self.kind = kind
        self.segment_names = {str(k): int(v) for k, v in (segment_names or {}).items()}
        self.series_uid = series_uid
        self.require_same_grid = require_same_grid

    def path_for(self, case_id: str) -> Path:
        return Path(self.path.replace("{case_id}", case_id)).expanduser()

    def check_ready(self) -> None:
        if "{case_id}" not in self.path and not Path(self.path).expanduser().exists():
            raise SegmentationError(f"precomputed segmentation {self.path} does not exist")

    def segment(self, ct: sitk.Image, case_id: str = "case") -> SegmentationResult:
        path = self.path_for(case_id)
        if not path.exists():
            raise SegmentationError(f"case {case_id}: precomputed segmentation {path} does not exist")
        try:
            source, kind, labels, details = self._read(path, case_id)
        except io.ImageInputError as exc:
            raise SegmentationError(f"case {case_id}: {exc}") from None
        labels = self._onto_ct(labels, ct, case_id, path)
        qc = quality_control(labels, ct, kind=kind)
        info = {"backend": self.name, "path": str(path), "source": source, **details}
        return SegmentationResult(labels=labels, kind=kind, backend=self.name, qc=qc, info=info)

    # -- readers ---------------------------------------------------------
    def _read(self, path: Path, case_id: str) -> tuple[str, str, sitk.Image, dict]:
        name = path.name.lower()
        if name.endswith(".seg.nrrd"):
            kind, labels, details = self._read_seg_nrrd(path, case_id)
            return "slicer_seg_nrrd", kind, labels, details
        if path.is_dir() or not io.has_image_suffix(path):
            kind, labels, details = self._read_dicom_seg(path, case_id)
            return "dicom_seg", kind, labels, details
        return "label_map", self.kind, self._read_label_map(path, case_id), {"code_map": self._code_map_name()}

    def _code_map_name(self):
        return self.code_map if isinstance(self.code_map, str) else {str(k): v for k, v in self.code_map.items()}

    def _read_label_map(self, path: Path, case_id: str) -> sitk.Image:
        image = io.read_label_map(path)
        array = sitk.GetArrayFromImage(image)
        code_map = self.code_map if isinstance(self.code_map, dict) else _named_code_maps()[self.code_map]
        if self.code_map == "lungatlas" and self.kind == "sides":
            code_map = {LABELS.right_lung.value: LABELS.right_lung.value, LABELS.left_lung.value: LABELS.left_lung.value}
        present = set(np.unique(array).tolist()) - {0}
        unknown = sorted(present - set(code_map))
        if unknown:
            raise SegmentationError(
                f"case {case_id}: {path} holds codes {unknown[:20]} that the code map "
                f"({self._code_map_name() if isinstance(self.code_map, str) else 'given'}) does not know; "
                "pass the right code map (e.g. --code-map totalsegmentator, or pairs like '10:4,11:5')")
        allowed = set(LABELS.lobe_values) if self.kind == "lobes" else {1, 2}
        bad = sorted({v for v in code_map.values() if v and v not in allowed})
        if bad:
            raise SegmentationError(f"case {case_id}: code map sends codes to {bad}, not {self.kind} values {sorted(allowed)}")
        out = sitk.GetImageFromArray(LABELS.remap(array.astype(np.int64), code_map))
        out.CopyInformation(image)
        return out

    def _assign(self, names_by_value: dict, case_id: str, path: Path) -> tuple[str, dict[int, int]]:
        """Map source values -> LungAtlas values from segment names; decide the kind."""
        matches = {}
        for source_value, names in names_by_value.items():
            hit = None
            for text in names:
                if text in self.segment_names:
                    hit = ("lobes" if self.kind == "lobes" else "sides", self.segment_names[text])
                    break
                hit = hit or match_region(text)
            if hit:
                matches[source_value] = hit
        lobes = {k: v for k, (kind, v) in matches.items() if kind == "lobes"}
        sides = {k: v for k, (kind, v) in matches.items() if kind == "sides"}
        listing = "; ".join(" / ".join(n for n in names if n) for names in names_by_value.values())
        if lobes:
            return "lobes", lobes
        if sides:
            return "sides", sides
        raise SegmentationError(f"case {case_id}: no lung lobe or lung segment found in {path}; segments: "
                                f"{listing or '(none)'}; name them with segment_names / --segment-name NAME=VALUE")

    def _read_seg_nrrd(self, path: Path, case_id: str) -> tuple[str, sitk.Image, dict]:
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        try:
            image = reader.Execute()
        except RuntimeError as exc:
            raise SegmentationError(f"case {case_id}: {path} cannot be read as a Slicer segmentation: "
                                    f"{str(exc).strip().splitlines()[-1]}") from None
        keys = set(image.GetMetaDataKeys())
        segments = sorted({int(m.group(1)) for k in keys if (m := re.match(r"Segment(\d+)_ID$", k))})
        if not segments:
            raise SegmentationError(f"case {case_id}: {path} has no Segment<i>_ID header fields: not a Slicer "
                                    "segmentation (read it as a label map with a code map instead)")
        n_layers = image.GetNumberOfComponentsPerPixel()
        if image.GetDimension() != 3:
            raise SegmentationError(f"case {case_id}: {path} is {image.GetDimension()}D, expected 3D (+ layers)")
        layers = [sitk.VectorIndexSelectionCast(image, i) for i in range(n_layers)] if n_layers > 1 else [image]
        names, where = {}, {}
        for i in range(len(segments)):
            index = segments[i]
            get = lambda field, default=None: (image.GetMetaData(f"Segment{index}_{field}")
                                              if f"Segment{index}_{field}" in keys else default)
            layer = int(get("Layer", "0" if n_layers == 1 else str(i)))
            value = int(get("LabelValue", "1"))
            texts = [get("Name", ""), get("ID", ""), get("Terminology", "")]
            names[(layer, value)] = [t for t in texts if t]
            where[(layer, value)] = get("Name", "")
        kind, assignment = self._assign(names, case_id, path)
        out = np.zeros(sitk.GetArrayViewFromImage(layers[0]).shape, np.uint8)
        for (layer, value), target in assignment.items():
            if layer >= len(layers):
                raise SegmentationError(f"case {case_id}: {path}: segment {where[(layer, value)]!r} is in layer "
                                        f"{layer} but the file has {len(layers)}")
            out[(sitk.GetArrayViewFromImage(layers[layer]) == value) & (out == 0)] = target
        labels = sitk.GetImageFromArray(out)
        labels.CopyInformation(layers[0])
        used = {where[k]: v for k, v in assignment.items()}
        return kind, labels, {"segments": used, "layers": len(layers)}

    def _read_dicom_seg(self, path: Path, case_id: str) -> tuple[str, sitk.Image, dict]:
        import highdicom as hd
        import pydicom

        files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file())
        seg_files = []
        for f in files:
            try:
                header = pydicom.dcmread(f, stop_before_pixels=True)
            except Exception:  # not DICOM: skip in a folder, report for a single file
                if path.is_file():
                    raise SegmentationError(f"case {case_id}: {f} is neither a label map (NIfTI/NRRD/MHA), a "
                                            "Slicer .seg.nrrd nor a DICOM file") from None
                continue
            if header.get("Modality") == "SEG":
                seg_files.append(f)
        if len(seg_files) != 1:
            raise SegmentationError(f"case {case_id}: {path}: expected one DICOM SEG object, found {len(seg_files)}")
        seg_path = seg_files[0]
        try:
            seg = hd.seg.segread(seg_path)
        except Exception as exc:
            raise SegmentationError(f"case {case_id}: {seg_path}: unreadable DICOM SEG: {exc}") from None
        referenced = sorted({str(item.SeriesInstanceUID) for item in seg.get("ReferencedSeriesSequence", [])})
        if self.series_uid is not None and referenced and self.series_uid not in referenced:
            raise SegmentationError(f"case {case_id}: DICOM SEG {seg_path} references series {referenced}, "
                                    f"not the CT series {self.series_uid}")
        names = {}
        for number in seg.get_segment_numbers():
            description = seg.get_segment_description(number)
            texts = [str(description.segment_label)]
            if "SegmentDescription" in description:
                texts.append(str(description.SegmentDescription))
            modifiers = [str(m.meaning) for m in getattr(description, "anatomic_regions", []) or []]
            prop = description.segmented_property_type
            prop_modifiers = [str(item.CodeMeaning) for item in
                              prop.get("SegmentedPropertyTypeModifierCodeSequence", [])] if hasattr(prop, "get") else []
            texts.append(" ".join([str(prop.meaning), *prop_modifiers, *modifiers]))
            names[number] = texts
        kind, assignment = self._assign(names, case_id, seg_path)
        try:
            volume = seg.get_volume(segment_numbers=sorted(assignment), combine_segments=True, relabel=False,
                                    dtype=np.uint8)
        except Exception as exc:
            raise SegmentationError(f"case {case_id}: {seg_path}: the segments cannot be placed on a regular "
                                    f"grid: {exc}") from None
        source = volume.to_simpleitk()
        array = sitk.GetArrayFromImage(source)
        lut = np.zeros(max(assignment) + 1, np.uint8)
        for number, target in assignment.items():
            lut[number] = target
        labels = sitk.GetImageFromArray(lut[array])
        labels.CopyInformation(source)
        used = {names[n][0]: v for n, v in assignment.items()}
        return kind, labels, {"segments": used, "seg_file": str(seg_path), "referenced_series": referenced}

    # -- onto the CT -----------------------------------------------------
    def _onto_ct(self, labels: sitk.Image, ct: sitk.Image, case_id: str, path: Path) -> sitk.Image:
        labels = sitk.Cast(labels, sitk.sitkUInt8)
        if geometry.same_grid(labels, ct, tolerance=1e-3):
            out = sitk.Image(labels)
            out.CopyInformation(ct)
            return out
        if self.require_same_grid:
            raise SegmentationError(
                f"case {case_id}: {path} is on another grid than the CT (size {labels.GetSize()} vs {ct.GetSize()}, "
                f"spacing {labels.GetSpacing()} vs {ct.GetSpacing()}); resampling was not allowed")
        before = float((sitk.GetArrayViewFromImage(labels) > 0).sum()) * geometry.voxel_volume_ml(labels)
        out = geometry.resample_to(labels, ct, is_label=True)
        after = float((sitk.GetArrayViewFromImage(out) > 0).sum()) * geometry.voxel_volume_ml(out)
        if before > 0 and after < MIN_KEPT_FRACTION * before:
            raise SegmentationError(
                f"case {case_id}: {path} lies mostly outside the CT ({after:.0f} of {before:.0f} mL of labels "
                "land inside its field of view): a segmentation of another scan?")
        return out
