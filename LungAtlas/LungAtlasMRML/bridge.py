"""The MRML bridge: the core's types <-> MRML nodes, in one place.

The core (LungAtlasLib) works in ITK's LPS millimetres on SimpleITK images;
Slicer's nodes live in RAS. Every LPS <-> RAS sign flip here goes through
``LungAtlasLib.geometry.lps_to_ras`` / ``ras_to_lps``, the project's only
definition of it.

Transform direction (the part that is easy to get backwards). A Slicer
transform node applied to a node maps that node's local coordinates to its
parent's ("ToParent"); volumes are resampled through the inverse, "FromParent".
Registration gives, with fixed = atlas and moving = patient:
``fixed_to_moving`` (atlas point -> patient point, what a resampler needs) and
``moving_to_fixed`` (patient point -> atlas point). Placing the patient CT,
segmentation or nodule markups under a node whose **FromParent is
fixed_to_moving** shows them in atlas space, and hardening moves patient points
to atlas points. :func:`registration_to_transform_node` builds that node; ITK
transform files written by Slicer from it hold fixed_to_moving in LPS, the
convention of ITK and of this project's transform files.
"""
from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np
import SimpleITK as sitk
import slicer
import vtk

from LungAtlasLib.geometry import lps_to_ras, ras_to_lps
from LungAtlasLib.labels import LABELS

LUNGATLAS_ATTRIBUTE_PREFIX = "LungAtlas."


def _scene(scene=None):
    scene = scene or slicer.mrmlScene
    if scene is None:
        raise RuntimeError("no MRML scene: pass one or set slicer.mrmlScene")
    return scene


def _vtk_matrix(matrix: np.ndarray) -> vtk.vtkMatrix4x4:
    out = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            out.SetElement(r, c, float(matrix[r, c]))
    return out


def _numpy_matrix(matrix: vtk.vtkMatrix4x4) -> np.ndarray:
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


# ---------------------------------------------------------------------------
# Volumes
# ---------------------------------------------------------------------------
def ijk_to_ras_matrix(image: sitk.Image) -> np.ndarray:
    """4x4 IJK -> RAS matrix of a SimpleITK image (voxel index -> RAS mm)."""
    direction = np.array(image.GetDirection()).reshape(3, 3)
    columns_lps = direction @ np.diag(image.GetSpacing())        # one column per voxel axis, LPS mm
    matrix = np.eye(4)
    matrix[:3, :3] = lps_to_ras(columns_lps.T).T
    matrix[:3, 3] = lps_to_ras(np.asarray(image.GetOrigin()))
    return matrix


def geometry_from_ijk_to_ras(matrix: np.ndarray) -> tuple[tuple, tuple, tuple]:
    """(origin, spacing, direction) in LPS, SimpleITK's form, from a 4x4 IJK -> RAS matrix."""
    columns_lps = ras_to_lps(np.asarray(matrix)[:3, :3].T).T
    spacing = np.linalg.norm(columns_lps, axis=0)
    direction = columns_lps / spacing
    origin = ras_to_lps(np.asarray(matrix)[:3, 3])
    return tuple(origin.tolist()), tuple(spacing.tolist()), tuple(direction.ravel().tolist())


def image_to_volume_node(image: sitk.Image, name: str = "Volume", node=None, label_map: bool = False,
                         scene=None):
    """A scalar (or label map) volume node holding ``image`` with its exact geometry.

    ``node``: update this node instead of adding a new one (its display is kept).
    """
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError(f"{name}: only scalar images become volume nodes "
                         f"(got {image.GetNumberOfComponentsPerPixel()} components)")
    scene = _scene(scene)
    if node is None:
        node_class = "vtkMRMLLabelMapVolumeNode" if label_map else "vtkMRMLScalarVolumeNode"
        node = scene.AddNewNodeByClass(node_class, name)
    node.SetIJKToRASMatrix(_vtk_matrix(ijk_to_ras_matrix(image)))
    slicer.util.updateVolumeFromArray(node, sitk.GetArrayViewFromImage(image))
    if node.GetDisplayNode() is None:
        node.CreateDefaultDisplayNodes()
    return node


def _world_matrix_of(node) -> np.ndarray:
    """4x4 local -> world matrix of the node's parent transforms; error if non-linear."""
    parent = node.GetParentTransformNode()
    if parent is None:
        return np.eye(4)
    if not parent.IsTransformToWorldLinear():
        raise ValueError(f"{node.GetName()}: is under the non-linear transform {parent.GetName()!r}; "
                         "harden the transform first (Data module: right-click > Harden transform)")
    matrix = vtk.vtkMatrix4x4()
    parent.GetMatrixTransformToWorld(matrix)
    return _numpy_matrix(matrix)


def volume_node_to_image(node) -> sitk.Image:
    """The voxels of a volume node as a SimpleITK image in LPS (linear parent transforms applied)."""
    if node is None or node.GetImageData() is None:
        raise ValueError("no volume selected, or the volume holds no image data")
    ijk_to_ras = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(ijk_to_ras)
    matrix = _world_matrix_of(node) @ _numpy_matrix(ijk_to_ras)
    array = slicer.util.arrayFromVolume(node)
    if array.ndim != 3:
        raise ValueError(f"{node.GetName()}: only scalar volumes can be used (array shape {array.shape})")
    image = sitk.GetImageFromArray(np.ascontiguousarray(array))
    origin, spacing, direction = geometry_from_ijk_to_ras(matrix)
    image.SetOrigin(origin)
    image.SetSpacing(spacing)
    image.SetDirection(direction)
    return image


# ---------------------------------------------------------------------------
# Segmentations
# ---------------------------------------------------------------------------
def regions_for(kind: str):
    """Label table regions of a label map kind: ``"lobes"`` (values 1-5) or ``"sides"`` (1 right, 2 left)."""
    if kind == "lobes":
        return list(LABELS.lobes)
    if kind == "sides":
        return [LABELS.right_lung, LABELS.left_lung]
    raise ValueError(f"unknown label map kind {kind!r}; expected 'lobes' or 'sides'")


def label_map_to_segmentation_node(labels: sitk.Image, kind: str = "lobes", name: str = "Lung lobes",
                                   node=None, reference_volume_node=None, scene=None):
    """A segmentation node with one segment per region of the label table.

    Segment IDs are the table's keys (``right_upper``, ..., or ``right_lung``/
    ``left_lung``), names its Slicer segment names and colours its colours; the
    voxels of value ``region.value`` form that region's segment. Regions absent
    from the map become empty segments (so a missing lobe is visible as such).
    Values not in the table are an error rather than silently dropped.
    """
    scene = _scene(scene)
    regions = regions_for(kind)
    array = sitk.GetArrayViewFromImage(labels)
    known = {0} | {r.value for r in regions}
    unknown = sorted(set(np.unique(array).tolist()) - known)
    if unknown:
        raise ValueError(f"{name}: label values {unknown} are not {kind} of the label table")
    label_node = image_to_volume_node(sitk.Cast(labels, sitk.sitkUInt8), "__lungatlas_labels__", label_map=True,
                                      scene=scene)
    created = node is None
    try:
        if created:
            node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
            node.CreateDefaultDisplayNodes()
        segmentation = node.GetSegmentation()
        segmentation.RemoveAllSegments()
        ids = vtk.vtkStringArray()
        for region in sorted(regions, key=lambda r: r.value):
            segmentation.AddEmptySegment(region.key, region.slicer_segment, region.color_float)
        # The import maps label value v to the v-th listed ID: list them for every value 1..max.
        for value in range(1, max(r.value for r in regions) + 1):
            match = [r for r in regions if r.value == value]
            ids.InsertNextValue(match[0].key if match else f"__unused_{value}")
        if reference_volume_node is not None:
            node.SetReferenceImageGeometryParameterFromVolumeNode(reference_volume_node)
        if not slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(label_node, node, ids):
            raise RuntimeError(f"{name}: importing the label map into the segmentation failed")
        for value in range(1, ids.GetNumberOfValues() + 1):
            unused = f"__unused_{value}"
            if segmentation.GetSegment(unused) is not None:
                segmentation.RemoveSegment(unused)
        node.SetAttribute(LUNGATLAS_ATTRIBUTE_PREFIX + "kind", kind)
    except Exception:
        if created and node is not None:
            scene.RemoveNode(node)
        raise
    finally:
        if label_node.GetDisplayNode() is not None:
            scene.RemoveNode(label_node.GetDisplayNode())
        scene.RemoveNode(label_node)
    return node


def _region_of_segment(segment_id: str, segment):
    for region in (*LABELS.lobes, LABELS.right_lung, LABELS.left_lung):
        if segment_id == region.key or segment.GetName() in (region.slicer_segment, region.name, region.key):
            return region
    return None


def segmentation_node_to_label_map(node, reference_volume_node) -> tuple[sitk.Image, str]:
    """(UInt8 label map on the reference volume's grid, kind) from a LungAtlas segmentation node.

    Segments are recognised by ID or name from the label table; others are ignored.
    Overlapping segments: the later region in the table wins.
    """
    if node is None:
        raise ValueError("no segmentation selected")
    segmentation = node.GetSegmentation()
    found = []
    for index in range(segmentation.GetNumberOfSegments()):
        segment_id = segmentation.GetNthSegmentID(index)
        region = _region_of_segment(segment_id, segmentation.GetSegment(segment_id))
        if region is not None:
            found.append((segment_id, region))
    if not found:
        raise ValueError(f"{node.GetName()}: no lung or lobe segments named as in the label table")
    lobe_keys = {r.key for r in LABELS.lobes}
    kind = "lobes" if all(region.key in lobe_keys for _, region in found) else "sides"
    reference = volume_node_to_image(reference_volume_node)
    out = np.zeros(sitk.GetArrayViewFromImage(reference).shape, np.uint8)
    scene = node.GetScene()
    label_node = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "__lungatlas_export__")
    try:
        for segment_id, region in sorted(found, key=lambda item: item[1].value):
            ids = vtk.vtkStringArray()
            ids.InsertNextValue(segment_id)
            if not slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
                    node, ids, label_node, reference_volume_node):
                raise RuntimeError(f"{node.GetName()}: exporting segment {segment_id!r} failed")
            mask = slicer.util.arrayFromVolume(label_node) > 0
            out[mask] = region.value
    finally:
        if label_node.GetDisplayNode() is not None:
            color = label_node.GetDisplayNode().GetColorNode()
            scene.RemoveNode(label_node.GetDisplayNode())
            if color is not None and color.GetName().startswith("__lungatlas"):
                scene.RemoveNode(color)
        scene.RemoveNode(label_node)
    image = sitk.GetImageFromArray(out)
    image.CopyInformation(reference)
    return image, kind


# ---------------------------------------------------------------------------
# Transforms
# ---------------------------------------------------------------------------
def _affine_parts(transform: sitk.Transform):
    """(A, b) with y = A x + b in LPS for SimpleITK transforms of the matrix family, else None."""
    try:
        matrix = np.array(transform.GetMatrix(), float).reshape(3, 3)
        translation = np.array(transform.GetTranslation(), float)
        center = np.array(transform.GetCenter(), float)
    except AttributeError:
        if transform.GetName() == "IdentityTransform":
            return np.eye(3), np.zeros(3)
        return None
    return matrix, center + translation - matrix @ center


def _ras_affine(matrix_lps: np.ndarray, offset_lps: np.ndarray) -> np.ndarray:
    """4x4 RAS matrix of the LPS map y = A x + b (F A F, F b with F the axis flip)."""
    out = np.eye(4)
    out[:3, :3] = lps_to_ras(lps_to_ras(matrix_lps).T).T
    out[:3, 3] = lps_to_ras(offset_lps)
    return out


def displacement_field_of(transform: sitk.Transform, reference: sitk.Image) -> sitk.Image:
    """The transform as a displacement field (VectorFloat64, LPS mm) on ``reference``'s grid."""
    if isinstance(transform, sitk.DisplacementFieldTransform):
        field = transform.GetDisplacementField()
        if field.GetSize() == reference.GetSize() and np.allclose(field.GetOrigin(), reference.GetOrigin()):
            return field
    return sitk.TransformToDisplacementField(transform, sitk.sitkVectorFloat64, reference.GetSize(),
                                             reference.GetOrigin(), reference.GetSpacing(),
                                             reference.GetDirection())


def _grid_transform_from_field(field: sitk.Image):
    """vtkOrientedGridTransform (RAS) of an LPS displacement field: grid points and vectors flipped."""
    array = sitk.GetArrayFromImage(field)                       # (z, y, x, 3), LPS components
    vectors_ras = lps_to_ras(array.reshape(-1, 3))
    grid = vtk.vtkImageData()
    grid.SetDimensions(*field.GetSize())
    grid.SetSpacing(*field.GetSpacing())
    grid.SetOrigin(*lps_to_ras(np.asarray(field.GetOrigin())))
    from vtk.util import numpy_support
    scalars = numpy_support.numpy_to_vtk(np.ascontiguousarray(vectors_ras, dtype=np.float64), deep=True)
    scalars.SetNumberOfComponents(3)
    grid.GetPointData().SetScalars(scalars)
    direction_ras = lps_to_ras(np.array(field.GetDirection()).reshape(3, 3).T).T
    direction = np.eye(4)
    direction[:3, :3] = direction_ras
    transform = slicer.vtkOrientedGridTransform()
    transform.SetDisplacementGridData(grid)
    transform.SetGridDirectionMatrix(_vtk_matrix(direction))
    transform.SetInterpolationModeToLinear()
    return transform


def transform_to_node(transform_from_parent: sitk.Transform, reference: sitk.Image | None = None,
                      name: str = "Transform", node=None, scene=None):
    """A transform node whose FromParent is ``transform_from_parent`` (an LPS SimpleITK transform).

    Matrix-family transforms become linear transform nodes exactly; anything else
    becomes a grid transform node sampled on ``reference``'s grid (the grid of
    the parent space, e.g. the atlas); a displacement field transform on that
    grid is used as is.
    """
    scene = _scene(scene)
    affine = _affine_parts(transform_from_parent)
    if affine is not None:
        node = node or scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", name)
        node.SetMatrixTransformFromParent(_vtk_matrix(_ras_affine(*affine)))
        return node
    if reference is None:
        raise ValueError(f"{name}: a non-linear transform needs the reference grid it is sampled on")
    field = displacement_field_of(transform_from_parent, reference)
    node = node or scene.AddNewNodeByClass("vtkMRMLGridTransformNode", name)
    node.SetAndObserveTransformFromParent(_grid_transform_from_field(field))
    return node


def registration_to_transform_node(fixed_to_moving: sitk.Transform, fixed_reference: sitk.Image,
                                   name: str = "Patient to atlas", node=None, scene=None):
    """Transform node that takes patient (moving) nodes into atlas (fixed) space (see module docstring)."""
    node = transform_to_node(fixed_to_moving, fixed_reference, name=name, node=node, scene=scene)
    node.SetAttribute(LUNGATLAS_ATTRIBUTE_PREFIX + "direction", "FromParent=atlas->patient; ToParent=patient->atlas")
    return node


def transform_node_to_sitk(node) -> sitk.Transform:
    """The node's FromParent transform as an LPS SimpleITK transform (atlas -> patient for a
    registration node): affine for linear nodes, displacement field for grid nodes."""
    if node is None:
        raise ValueError("no transform selected")
    if node.IsLinear():
        matrix = vtk.vtkMatrix4x4()
        node.GetMatrixTransformFromParent(matrix)
        ras = _numpy_matrix(matrix)
        affine = sitk.AffineTransform(3)
        affine.SetMatrix(lps_to_ras(lps_to_ras(ras[:3, :3]).T).T.ravel().tolist())
        affine.SetTranslation(lps_to_ras(ras[:3, 3]).tolist())
        return affine
    grid = node.GetTransformFromParentAs("vtkOrientedGridTransform", False)
    if grid is None or grid.GetInverseFlag():
        raise ValueError(f"{node.GetName()}: only linear and grid (displacement field) transforms are supported; "
                         "convert it with the Transforms module first")
    data = grid.GetDisplacementGrid()
    from vtk.util import numpy_support
    size = data.GetDimensions()
    vectors = numpy_support.vtk_to_numpy(data.GetPointData().GetScalars()).reshape(size[2], size[1], size[0], 3)
    vectors = vectors * grid.GetDisplacementScale() + grid.GetDisplacementShift()
    field = sitk.GetImageFromArray(ras_to_lps(vectors.reshape(-1, 3)).reshape(vectors.shape), isVector=True)
    field.SetSpacing(data.GetSpacing())
    field.SetOrigin(tuple(ras_to_lps(np.asarray(data.GetOrigin())).tolist()))
    direction_ras = _numpy_matrix(grid.GetGridDirectionMatrix())[:3, :3]
    field.SetDirection(tuple(ras_to_lps(direction_ras.T).T.ravel().tolist()))
    return sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64))


def map_points_to_parent(node, points_ras: np.ndarray) -> np.ndarray:
    """Points (N, 3, RAS) through the node's ToParent transform (patient -> atlas for a registration node)."""
    to_parent = node.GetTransformToParent()
    return np.array([to_parent.TransformPoint(*map(float, p)) for p in np.atleast_2d(points_ras)])


# ---------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------
def _is_number(value) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def rows_to_table_node(rows: Sequence[dict], name: str = "Table", node=None, columns: Iterable[str] | None = None,
                       scene=None):
    """A table node from rows (dicts); numeric columns become double columns (NaN for blanks),
    others string columns. Column order: ``columns`` or first appearance."""
    scene = _scene(scene)
    if columns is None:
        columns = []
        for row in rows:
            columns.extend(k for k in row if k not in columns)
    columns = list(columns)
    node = node or scene.AddNewNodeByClass("vtkMRMLTableNode", name)
    table = node.GetTable()
    table.Initialize()
    for column in columns:
        values = [row.get(column) for row in rows]
        numeric = all(v is None or _is_number(v) for v in values) and any(v is not None for v in values)
        if numeric:
            array = vtk.vtkDoubleArray()
            for v in values:
                array.InsertNextValue(float("nan") if v is None else float(v))
        else:
            array = vtk.vtkStringArray()
            for v in values:
                array.InsertNextValue("" if v is None else str(v))
        array.SetName(column)
        table.AddColumn(array)
    table.Modified()
    node.Modified()
    return node


def table_node_to_rows(node) -> list[dict]:
    """Rows (dicts) of a table node; numeric columns as floats."""
    table = node.GetTable()
    rows = [{} for _ in range(table.GetNumberOfRows())]
    for c in range(table.GetNumberOfColumns()):
        column = table.GetColumn(c)
        name = column.GetName()
        for r, row in enumerate(rows):
            if isinstance(column, vtk.vtkStringArray):
                row[name] = column.GetValue(r)
            else:
                row[name] = float(column.GetValue(r))
    return rows


# ---------------------------------------------------------------------------
# Markups
# ---------------------------------------------------------------------------
def points_to_markups_node(points_lps, labels: Sequence[str] | None = None, name: str = "Points",
                           node=None, descriptions: Sequence[str] | None = None, scene=None):
    """A markups point list from (N, 3) LPS mm points (stored in RAS, as Slicer does)."""
    scene = _scene(scene)
    points_lps = np.atleast_2d(np.asarray(points_lps, float)) if len(points_lps) else np.zeros((0, 3))
    node = node or scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", name)
    if node.GetDisplayNode() is None:
        node.CreateDefaultDisplayNodes()
    node.RemoveAllControlPoints()
    for index, point in enumerate(lps_to_ras(points_lps) if len(points_lps) else []):
        label = labels[index] if labels is not None else f"{name}-{index + 1}"
        n = node.AddControlPoint(vtk.vtkVector3d(*map(float, point)), label)
        if descriptions is not None:
            node.SetNthControlPointDescription(n, descriptions[index])
    return node


def markups_node_to_points(node, world: bool = True) -> tuple[np.ndarray, list[str]]:
    """((N, 3) LPS mm, labels) of a markups node; ``world`` applies its parent transforms."""
    n = node.GetNumberOfControlPoints()
    ras = np.zeros((n, 3))
    for i in range(n):
        position = [0.0, 0.0, 0.0]
        if world:
            node.GetNthControlPointPositionWorld(i, position)
        else:
            node.GetNthControlPointPosition(i, position)
        ras[i] = position
    return ras_to_lps(ras), [node.GetNthControlPointLabel(i) for i in range(n)]


def check_finite(points: np.ndarray, what: str) -> None:
    if not np.all(np.isfinite(points)):
        bad = [i for i, p in enumerate(points) if not all(math.isfinite(c) for c in p)]
        raise ValueError(f"{what}: points {bad} are not finite")
