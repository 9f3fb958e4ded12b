"""Render the documentation screenshots offscreen from real MRML scenes (slicer-core + VTK).

    .venv/bin/python Resources/Screenshots/render_screenshots.py [--out Resources/Screenshots]

Each picture is built the way the LungAtlas module builds its scene (the module's
logic and the MRML bridge, Slicer's segmentation converters for the lobe
surfaces, Slicer's colour tables for the density map) and drawn with VTK
offscreen: a 3D view (segment closed surfaces, points) and a coronal and an
axial slice (volume with its overlay blended as the slice views do).
Inputs: the real CT LUNG1-001 (4 mm) from ../shared/data/ct (or
$LUNGATLAS_TEST_DATA) and the phantom atlas of LungAtlasLib.phantom.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
# No display here: render through EGL (Mesa's software EGL works without a GPU or X server).
os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")
sys.path[:0] = [str(REPO / "LungAtlas"), str(REPO / "Testing" / "slicer_stubs")]

import SimpleITK as sitk  # noqa: E402
import slicer  # noqa: E402
import vtk  # noqa: E402
from vtk.util import numpy_support  # noqa: E402

from LungAtlasLib.geometry import lps_to_ras  # noqa: E402
from LungAtlasMRML import bridge  # noqa: E402
from LungAtlasMRML.headless import make_scene  # noqa: E402

SIZE = (1500, 560)


def _lut(color_node, n=256):
    """(n, 4) RGBA in [0, 1] from a Slicer colour node's lookup table."""
    table = color_node.GetLookupTable() if color_node.GetLookupTable() else color_node.GetScalarsToColors()
    low, high = table.GetRange()
    out = np.ones((n, 4))
    for i in range(n):
        rgb = [0.0, 0.0, 0.0]
        table.GetColor(low + (high - low) * i / (n - 1), rgb)
        out[i, :3] = rgb
    return out


def _slice_rgb(volume, overlay, axis, index, window=(-1000, 400), overlay_opacity=0.6, label_colors=None):
    """RGB of one slice (numpy order axis 0 = k, 1 = j), background windowed grey + overlay blended."""
    array = slicer.util.arrayFromVolume(volume)
    sl = np.take(array, index, axis=axis).astype(float)
    grey = np.clip((sl - window[0]) / (window[1] - window[0]), 0, 1)
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    if overlay is not None:
        values = np.take(slicer.util.arrayFromVolume(overlay), index, axis=axis).astype(float)
        if label_colors is not None:
            for value, color in label_colors.items():
                mask = values == value
                rgb[mask] = (1 - overlay_opacity) * rgb[mask] + overlay_opacity * np.asarray(color)
        else:
            display = overlay.GetDisplayNode()
            lut = _lut(display.GetColorNode())
            low, high = display.GetWindowLevelMin(), display.GetWindowLevelMax()
            position = np.clip((values - low) / max(high - low, 1e-9), 0, 1)
            colors = lut[(position * (len(lut) - 1)).astype(int)][..., :3]
            mask = values >= display.GetLowerThreshold()
            rgb[mask] = (1 - overlay_opacity) * rgb[mask] + overlay_opacity * colors[mask]
    return rgb


def _image_actor(rgb, spacing_xy):
    """A 2D image actor of an RGB slice; VTK puts row 0 at the bottom, so the caller
    orders rows bottom-up (inferior first for coronal, posterior first for axial)."""
    rgb = np.ascontiguousarray((rgb * 255).astype(np.uint8))
    image = vtk.vtkImageData()
    image.SetDimensions(rgb.shape[1], rgb.shape[0], 1)
    image.SetSpacing(spacing_xy[0], spacing_xy[1], 1)
    scalars = numpy_support.numpy_to_vtk(rgb.reshape(-1, 3), deep=True)
    scalars.SetNumberOfComponents(3)
    image.GetPointData().SetScalars(scalars)
    actor = vtk.vtkImageActor()
    actor.GetMapper().SetInputData(image)
    return actor


def _text(renderer, text, size=18, y=0.93):
    actor = vtk.vtkTextActor()
    actor.SetInput(text)
    actor.GetTextProperty().SetFontSize(size)
    actor.GetTextProperty().SetColor(1, 1, 1)
    actor.GetPositionCoordinate().SetCoordinateSystemToNormalizedViewport()
    actor.SetPosition(0.03, y)
    renderer.AddViewProp(actor)


def render(path, title, volume, overlay=None, segmentation=None, points_ras=None, label_colors=None,
           overlay_opacity=0.6, slices=None, captions=("3D", "coronal", "axial")):
    window = vtk.vtkRenderWindow()
    window.SetOffScreenRendering(1)
    window.SetSize(*SIZE)
    # 3D view: lobe surfaces from the segmentation node's closed-surface representation
    three_d = vtk.vtkRenderer()
    three_d.SetViewport(0.0, 0.0, 0.4, 1.0)
    three_d.SetBackground(0.08, 0.09, 0.14)
    if segmentation is not None:
        segmentation.CreateClosedSurfaceRepresentation()
        seg = segmentation.GetSegmentation()
        for i in range(seg.GetNumberOfSegments()):
            segment_id = seg.GetNthSegmentID(i)
            surface = segmentation.GetClosedSurfaceInternalRepresentation(segment_id)
            if surface is None or surface.GetNumberOfPoints() == 0:
                continue
            mapper = vtk.vtkPolyDataMapper()
            mapper.SetInputData(surface)
            actor = vtk.vtkActor()
            actor.SetMapper(mapper)
            actor.GetProperty().SetColor(*seg.GetSegment(segment_id).GetColor())
            actor.GetProperty().SetOpacity(0.45 if points_ras is not None else 0.9)
            three_d.AddActor(actor)
    if points_ras is not None:
        for point in points_ras:
            sphere = vtk.vtkSphereSource()
            sphere.SetCenter(*point)
            sphere.SetRadius(5.0)
            mapper = vtk.vtkPolyDataMapper()
            mapper.SetInputConnection(sphere.GetOutputPort())
            actor = vtk.vtkActor()
            actor.SetMapper(mapper)
            actor.GetProperty().SetColor(1.0, 0.85, 0.1)
            three_d.AddActor(actor)
    camera = three_d.GetActiveCamera()
    camera.SetFocalPoint(0, 0, 0)
    camera.SetPosition(0, 1, 0)      # anterior view (RAS: +y is anterior)
    camera.SetViewUp(0, 0, 1)
    three_d.ResetCamera()
    camera.Azimuth(25)
    camera.Elevation(10)
    camera.Zoom(1.3)
    _text(three_d, f"{title}\n{captions[0]}")
    window.AddRenderer(three_d)

    array = slicer.util.arrayFromVolume(volume)
    spacing = volume.GetSpacing()
    k_index, j_index = slices or (array.shape[0] // 2, array.shape[1] // 2)
    panels = []
    # coronal: fixed j (numpy axis 1) -> rows k, inferior first (bottom), columns i
    coronal = _slice_rgb(volume, overlay, 1, j_index, overlay_opacity=overlay_opacity, label_colors=label_colors)
    panels.append((coronal, (spacing[0], spacing[2]), captions[1]))
    axial = _slice_rgb(volume, overlay, 0, k_index, overlay_opacity=overlay_opacity, label_colors=label_colors)
    # axial rows are j (anterior first): flip so that posterior is at the bottom, anterior up
    panels.append((np.flipud(axial), (spacing[0], spacing[1]), captions[2]))
    for index, (rgb, spacing_xy, caption) in enumerate(panels):
        renderer = vtk.vtkRenderer()
        renderer.SetViewport(0.4 + 0.3 * index, 0.0, 0.7 + 0.3 * index, 1.0)
        renderer.SetBackground(0, 0, 0)
        # LPS-ordered arrays have the patient's right on the left of the image, as radiologists view it
        renderer.AddActor(_image_actor(rgb, spacing_xy))
        renderer.GetActiveCamera().ParallelProjectionOn()
        renderer.ResetCamera()
        renderer.GetActiveCamera().Zoom(1.15)
        _text(renderer, caption)
        window.AddRenderer(renderer)
    window.Render()
    grab = vtk.vtkWindowToImageFilter()
    grab.SetInput(window)
    grab.Update()
    writer = vtk.vtkPNGWriter()
    writer.SetFileName(str(path))
    writer.SetInputConnection(grab.GetOutputPort())
    writer.Write()
    print("wrote", path)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent))
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = Path(os.environ.get("LUNGATLAS_TEST_DATA", REPO.parent / "shared" / "data" / "ct"))

    import LungAtlas
    from LungAtlasLib import phantom
    from LungAtlasLib.io import write_image
    from LungAtlasLib.labels import LABELS
    from LungAtlasLib.segmentation import get_segmenter
    from scipy import ndimage

    headless = make_scene()
    logic = LungAtlas.LungAtlasLogic()

    # 1. Segment: the real CT with the classical backend's lungs (offline, no weights)
    ct_node = logic.loadCT(data / "nsclc-lung1-001" / "lung1-001_ct_4mm.nii.gz", "LUNG1-001")
    result = get_segmenter("classical").segment(bridge.volume_node_to_image(ct_node), "LUNG1-001")
    lungs = bridge.label_map_to_segmentation_node(result.labels, result.kind, name="LUNG1-001 lungs",
                                                  reference_volume_node=ct_node)
    label_node = bridge.image_to_volume_node(result.labels, "lungs", label_map=True)
    colors = {r.value: r.color_float for r in bridge.regions_for(result.kind)}
    render(out / "segment_step.png", "Segment: LUNG1-001, classical backend (lungs)", ct_node, label_node, lungs,
           label_colors=colors, overlay_opacity=0.35)

    # 2-3. Atlas view: phantom atlas template, lobes, nodule density (Gaussian 8 mm over seeded nodule sites)
    atlas = phantom.make_atlas_subject(spacing_mm=3.0)
    rng = np.random.default_rng(7)
    lobes = sitk.GetArrayViewFromImage(atlas.labels)
    counts = np.zeros(lobes.shape, np.float32)
    weights = {1: 1.8, 2: 0.8, 3: 0.8, 4: 1.3, 5: 0.8}
    for lobe, weight in weights.items():
        sites = np.argwhere(ndimage.binary_erosion(lobes == lobe, iterations=3))
        for site in sites[rng.integers(len(sites), size=int(60 * weight))]:
            counts[tuple(site)] += 1
    density = ndimage.gaussian_filter(counts, 8.0 / 3.0)
    density_image = sitk.GetImageFromArray(density.astype(np.float32))
    density_image.CopyInformation(atlas.ct)
    folder = out / ".atlas_tmp"
    write_image(atlas.ct, folder / "template.nii.gz")
    write_image(atlas.labels, folder / "template_lobes.nii.gz")
    write_image(density_image, folder / "nodule_density_all.nii.gz")
    nodes = logic.showAtlas(str(folder), opacity=0.65, colorMap="PET-Heat")
    centre = [int(np.argmax(density.sum(axis=(1, 2)))), int(np.argmax(density.sum(axis=(0, 2))))]
    render(out / "atlas_view.png", "LungAtlas: nodule density over the atlas template (phantom atlas)",
           nodes["template"], nodes["density"], nodes["lobes"], overlay_opacity=0.65, slices=centre,
           captions=("3D: atlas lobes", "coronal: density (PET-Heat)", "axial: density (PET-Heat)"))

    # 4. Nodules in atlas space: points of the phantom subjects' nodules shown on the lobes
    points = []
    for seed in range(1, 9):
        subject = phantom.make_subject(seed=seed, spacing_mm=8.0, n_nodules=3)
        points += [n.centre_atlas_lps for n in subject.nodules]
    render(out / "nodules_step.png", "Nodule sites in atlas space (phantom subjects, truth positions)", nodes["template"], None,
           nodes["lobes"], points_ras=lps_to_ras(np.array(points)), slices=centre)
    for name in ("template.nii.gz", "template_lobes.nii.gz", "nodule_density_all.nii.gz"):
        (folder / name).unlink()
    folder.rmdir()
    headless.close()


if __name__ == "__main__":
    main()
