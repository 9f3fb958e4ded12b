"""An MRML scene set up the way Slicer sets it up, for plain Python with ``slicer-core``.

Inside the Slicer application this is never needed (``slicer.mrmlScene`` and the
module logics exist). Under the PyPI ``slicer-core`` package two things must be
done by hand before module logic behaves as in Slicer:

- colour table nodes exist only once a colour logic, attached to an application
  logic, is given the scene;
- segment representation converter rules (binary labelmap <-> closed surface)
  register only when a segmentations logic is given the scene;
- markups storage classes (.mrk.json) register with the markups logic.
"""
from __future__ import annotations

from dataclasses import dataclass

import slicer


@dataclass
class HeadlessScene:
    """The scene plus the logics that must stay alive as long as it is used."""

    scene: "slicer.vtkMRMLScene"
    application_logic: "slicer.vtkSlicerApplicationLogic"
    segmentations_logic: "slicer.vtkSlicerSegmentationsModuleLogic"
    transform_logic: "slicer.vtkSlicerTransformLogic"
    tables_logic: "slicer.vtkSlicerTablesLogic"
    markups_logic: "slicer.vtkSlicerMarkupsLogic"

    def close(self) -> None:
        self.scene.Clear(True)


def make_scene(install: bool = True) -> HeadlessScene:
    """Create a scene with default colour nodes and segmentation converters.

    ``install``: also make it ``slicer.mrmlScene`` so that module logic written
    for the Slicer application (which reads ``slicer.mrmlScene``) uses it.
    """
    scene = slicer.vtkMRMLScene()
    app_logic = slicer.vtkSlicerApplicationLogic()
    app_logic.SetMRMLScene(scene)
    color_logic = app_logic.GetColorLogic()
    if color_logic is None:  # older slicer-core builds create no colour logic
        color_logic = slicer.vtkSlicerColorLogic()
        app_logic.SetColorLogic(color_logic)
    color_logic.SetMRMLApplicationLogic(app_logic)
    color_logic.SetMRMLScene(scene)
    if scene.GetNumberOfNodesByClass("vtkMRMLColorTableNode") == 0:
        color_logic.AddDefaultColorNodes()
    segmentations_logic = slicer.vtkSlicerSegmentationsModuleLogic()
    segmentations_logic.SetMRMLApplicationLogic(app_logic)
    segmentations_logic.SetMRMLScene(scene)
    transform_logic = slicer.vtkSlicerTransformLogic()
    transform_logic.SetMRMLScene(scene)
    tables_logic = slicer.vtkSlicerTablesLogic()
    tables_logic.SetMRMLScene(scene)
    # registers the markups node and storage classes (.mrk.json) with the scene
    markups_logic = slicer.vtkSlicerMarkupsLogic()
    markups_logic.SetMRMLApplicationLogic(app_logic)
    markups_logic.SetMRMLScene(scene)
    if install:
        slicer.mrmlScene = scene
    return HeadlessScene(scene, app_logic, segmentations_logic, transform_logic, tables_logic, markups_logic)
