"""Reading and writing CT images and label maps: the one place that touches image files.

Images are SimpleITK images in physical space (LPS, mm), exactly as the file
describes them: origin, spacing and direction are never rounded or dropped.
DICOM series are read with GDCM (through SimpleITK), which applies rescale
slope/intercept, after a header-only check with pydicom that turns the usual
ways a series is broken into errors naming the file.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

IMAGE_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd", ".seg.nrrd")
WRITE_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".seg.nrrd", ".mha")

# Slice gaps may differ by this fraction of the nominal gap before a series is
# called uneven (scanner positions are written with limited precision).
SLICE_GAP_TOLERANCE = 0.05


class ImageInputError(ValueError):
    """An input image cannot be used; the message names the file and the problem."""

    def __init__(self, path, problem: str, hint: str = ""):
        self.path = str(path)
        self.problem = problem
        message = f"{path}: {problem}"
        if hint:
            message += f" ({hint})"
        super().__init__(message)


@dataclass(frozen=True)
class DicomSeries:
    """One DICOM series found in a folder (header facts only)."""

    series_uid: str
    modality: str
    description: str
    files: tuple[str, ...]
    slice_thickness: float | None
    kernel: str

    @property
    def n_slices(self) -> int:
        return len(self.files)


def has_image_suffix(path: str | Path) -> bool:
    name = str(path).lower()
    return any(name.endswith(s) for s in IMAGE_SUFFIXES)


# ---------------------------------------------------------------------------
# DICOM
# ---------------------------------------------------------------------------
def list_dicom_series(folder: str | Path) -> list[DicomSeries]:
    """All DICOM series directly inside ``folder``, from headers only."""
    import pydicom

    folder = Path(folder)
    if not folder.exists():
        raise ImageInputError(folder, "path does not exist")
    if not folder.is_dir():
        raise ImageInputError(folder, "is not a folder of DICOM files")
    series_ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    found = []
    listed: set[str] = set()
    for uid in series_ids:
        files = tuple(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid))
        listed.update(os.path.abspath(f) for f in files)
        try:
            header = pydicom.dcmread(files[0], stop_before_pixels=True)
        except Exception as exc:  # pydicom raises many types for broken files
            raise ImageInputError(files[0], f"unreadable DICOM header: {exc}") from None
        thickness = header.get("SliceThickness")
        kernel = header.get("ConvolutionKernel", "")
        found.append(DicomSeries(
            series_uid=uid,
            modality=str(header.get("Modality", "")),
            description=str(header.get("SeriesDescription", "")),
            files=files,
            slice_thickness=float(thickness) if thickness not in (None, "") else None,
            kernel="\\".join(kernel) if isinstance(kernel, (list, pydicom.multival.MultiValue)) else str(kernel),
        ))
    _raise_for_skipped_dicom_files(folder, listed)
    return found


def _raise_for_skipped_dicom_files(folder: Path, listed: set[str]) -> None:
    """GDCM silently leaves out files it cannot parse (e.g. truncated ones), which
    would turn into a 'missing slice' far from its cause: name them instead."""
    import pydicom

    for path in sorted(folder.iterdir()):
        if not path.is_file() or os.path.abspath(path) in listed:
            continue
        try:
            with open(path, "rb") as f:
                looks_dicom = f.read(132)[128:132] == b"DICM"
        except OSError as exc:
            raise ImageInputError(path, f"cannot be read: {exc.strerror}") from None
        if not looks_dicom:
            continue
        try:
            ds = pydicom.dcmread(path)
            if "PixelData" in ds:
                ds.pixel_array  # noqa: B018 - decoding is the check
        except Exception as exc:
            raise ImageInputError(path, f"DICOM file is truncated or corrupt: {exc}") from None


def _check_dicom_headers(files: tuple[str, ...], require_ct: bool) -> None:
    """Header-only checks that name the offending file: readable, CT, one
    orientation, evenly spaced slices with none missing."""
    import pydicom

    positions = []
    orientation = None
    for name in files:
        try:
            ds = pydicom.dcmread(name, stop_before_pixels=True)
        except Exception as exc:
            raise ImageInputError(name, f"unreadable DICOM file: {exc}") from None
        modality = str(ds.get("Modality", ""))
        if require_ct and modality != "CT":
            raise ImageInputError(name, f"modality is {modality or 'missing'!s}, not CT",
                                  "LungAtlas reads CT series only")
        if "ImagePositionPatient" not in ds or "ImageOrientationPatient" not in ds:
            raise ImageInputError(name, "no ImagePositionPatient/ImageOrientationPatient: not an image slice")
        iop = np.array(ds.ImageOrientationPatient, float)
        if orientation is None:
            orientation = iop
        elif not np.allclose(iop, orientation, atol=1e-4):
            raise ImageInputError(name, "slice orientation differs from the rest of the series")
        positions.append(np.array(ds.ImagePositionPatient, float))
    if len(files) < 2:
        raise ImageInputError(files[0], "the series has a single slice: a 3D CT volume is needed")
    normal = np.cross(orientation[:3], orientation[3:])
    along = np.sort(np.array(positions) @ normal)
    gaps = np.diff(along)
    if np.any(gaps < 1e-3):
        raise ImageInputError(Path(files[0]).parent, "two slices share one position (duplicate or mixed series)")
    nominal = float(np.median(gaps))
    worst = int(np.argmax(np.abs(gaps - nominal)))
    if abs(gaps[worst] - nominal) > SLICE_GAP_TOLERANCE * nominal:
        kind = "a missing slice" if gaps[worst] > nominal else "uneven slice spacing"
        raise ImageInputError(
            Path(files[0]).parent,
            f"{kind}: gap of {gaps[worst]:.3f} mm between slices at {along[worst]:.2f} and "
            f"{along[worst + 1]:.2f} mm, others {nominal:.3f} mm",
            "the series cannot be read as one regular volume")


def read_dicom_series(folder: str | Path, series_uid: str | None = None,
                      require_ct: bool = True) -> sitk.Image:
    """Read one DICOM series from ``folder`` (HU, rescale applied, LPS geometry).

    With several series in the folder, ``series_uid`` must say which one; the
    error lists them. Header problems (non-CT, missing or uneven slices) and
    unreadable files raise :class:`ImageInputError` naming the file.
    """
    folder = Path(folder)
    series = list_dicom_series(folder)
    if not series:
        raise ImageInputError(folder, "no DICOM series found in this folder")
    if series_uid is None:
        if len(series) > 1:
            listing = "; ".join(f"{s.series_uid} ({s.modality}, {s.n_slices} files, '{s.description}')"
                                for s in series)
            raise ImageInputError(folder, f"{len(series)} DICOM series found, choose one by series UID: {listing}")
        chosen = series[0]
    else:
        matches = [s for s in series if s.series_uid == series_uid]
        if not matches:
            raise ImageInputError(folder, f"series {series_uid} not found; present: "
                                  f"{[s.series_uid for s in series]}")
        chosen = matches[0]
    _check_dicom_headers(chosen.files, require_ct)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(list(chosen.files))
    try:
        image = reader.Execute()
    except RuntimeError:
        _raise_for_bad_pixel_data(chosen.files)
        raise
    return _validated(image, folder)


def _raise_for_bad_pixel_data(files) -> None:
    """After GDCM failed on a series: find and name the file that broke it."""
    import pydicom

    for name in files:
        try:
            ds = pydicom.dcmread(name)
            ds.pixel_array  # noqa: B018 - decoding is the check
        except Exception as exc:
            raise ImageInputError(name, f"pixel data cannot be decoded (truncated or corrupt file?): {exc}") from None


# ---------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------
def _validated(image: sitk.Image, path) -> sitk.Image:
    if image.GetDimension() != 3:
        raise ImageInputError(path, f"is a {image.GetDimension()}D image; a 3D volume is needed")
    if min(image.GetSize()) < 2:
        raise ImageInputError(path, f"has size {image.GetSize()}: a 3D volume with several slices is needed")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise ImageInputError(path, f"has {image.GetNumberOfComponentsPerPixel()} components per voxel; "
                              "a scalar image is needed")
    if image.GetPixelID() in (sitk.sitkFloat32, sitk.sitkFloat64):
        array = sitk.GetArrayViewFromImage(image)
        if not np.isfinite(array).all():
            n_bad = int((~np.isfinite(array)).sum())
            raise ImageInputError(path, f"contains {n_bad} NaN or infinite voxel values")
    spacing = image.GetSpacing()
    if not all(math.isfinite(s) and s > 0 for s in spacing):
        raise ImageInputError(path, f"has invalid voxel spacing {spacing}")
    return image


def read_image(path: str | Path, series_uid: str | None = None, require_ct: bool = True) -> sitk.Image:
    """Read a CT volume from NIfTI, NRRD, MHA/MHD or a DICOM series folder."""
    path = Path(path)
    if not path.exists():
        raise ImageInputError(path, "path does not exist")
    if path.is_dir():
        return read_dicom_series(path, series_uid, require_ct=require_ct)
    if not os.access(path, os.R_OK):
        raise ImageInputError(path, "file is not readable (permissions)")
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        first_line = str(exc).strip().splitlines()[-1] if str(exc).strip() else "unknown reader error"
        raise ImageInputError(path, f"cannot be read as an image: {first_line}") from None
    if path.name.lower().endswith((".nii", ".nii.gz")):
        _check_nifti_finite(path)
    return _validated(image, path)


def _check_nifti_finite(path: Path) -> None:
    """ITK's NIfTI reader turns NaN voxels into 0 without a word; a CT with NaN is
    broken upstream, so look at the stored floats themselves (float files only)."""
    import nibabel

    nifti = nibabel.load(str(path))
    if not np.issubdtype(nifti.get_data_dtype(), np.floating):
        return
    data = np.asanyarray(nifti.dataobj)
    n_bad = int(np.size(data) - np.count_nonzero(np.isfinite(data)))
    if n_bad:
        raise ImageInputError(path, f"contains {n_bad} NaN or infinite voxel values")


def read_label_map(path: str | Path) -> sitk.Image:
    """Read a label map (any integer image file) as UInt8 on its own grid."""
    path = Path(path)
    image = read_image(path, require_ct=False)
    array = sitk.GetArrayViewFromImage(image)
    if np.any(array < 0) or np.any(array > 255) or np.any(np.asarray(array) != np.round(array)):
        raise ImageInputError(path, "is not a label map (values must be integers 0-255)")
    return sitk.Cast(image, sitk.sitkUInt8)


def write_image(image: sitk.Image, path: str | Path, compress: bool = True) -> Path:
    """Write NIfTI (.nii/.nii.gz), NRRD (.nrrd, .seg.nrrd) or MHA; creates the folder;
    writes to a temporary name first so that a crash never leaves a half file."""
    path = Path(path)
    if not str(path).lower().endswith(WRITE_SUFFIXES):
        raise ValueError(f"{path}: unsupported output format; use one of {WRITE_SUFFIXES}")
    path.parent.mkdir(parents=True, exist_ok=True)
    name = path.name
    suffix = next(s for s in sorted(WRITE_SUFFIXES, key=len, reverse=True) if name.lower().endswith(s))
    tmp = path.with_name(f".{name[: -len(suffix)]}.tmp{os.getpid()}{suffix}")
    sitk.WriteImage(image, str(tmp), compress)
    os.replace(tmp, path)
    return path


# ---------------------------------------------------------------------------
# Orientation
# ---------------------------------------------------------------------------
CANONICAL_ORIENTATION = "LPS"  # ITK's own axes: identity direction matrix for axis-aligned scans


def orientation_of(image: sitk.Image) -> str:
    """Three-letter DICOM orientation code of the image axes (SimpleITK's convention)."""
    return sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(image.GetDirection())


def reorient(image: sitk.Image, orientation: str = CANONICAL_ORIENTATION) -> sitk.Image:
    """Permute/flip voxel axes to ``orientation``; physical geometry is unchanged,
    only the array layout changes. Reorienting back with :func:`orientation_of`
    of the original restores the original exactly."""
    return sitk.DICOMOrient(image, orientation)


def to_canonical(image: sitk.Image) -> tuple[sitk.Image, str]:
    """Return the image in canonical orientation and the code to undo it."""
    original = orientation_of(image)
    return reorient(image, CANONICAL_ORIENTATION), original


def from_canonical(image: sitk.Image, original_orientation: str) -> sitk.Image:
    return reorient(image, original_orientation)
