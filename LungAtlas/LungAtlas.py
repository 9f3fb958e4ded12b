"""LungAtlas: interactive Slicer module (one loaded chest CT: segment, register, inspect, nodules, atlas).

The logic class is Qt-free so that it runs under real Slicer and under the
PyPI ``slicer-core`` package in plain Python (tests); Qt lives in the widget.
The science is in the Slicer-free core package ``LungAtlasLib``.
"""
import os

import slicer
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)


class LungAtlas(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "LungAtlas"
        self.parent.categories = ["Quantification"]
        self.parent.dependencies = []
        self.parent.contributors = ["LungAtlas developers"]
        self.parent.helpText = ("Segment the lungs and lobes of a chest CT, register it to the lung atlas, "
                                "measure alignment, map nodules into atlas space and view the nodule atlas.")
        self.parent.acknowledgementText = ("Uses TotalSegmentator and uniGradICON; built on 3D Slicer.")


class LungAtlasWidget(ScriptedLoadableModuleWidget):
    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/LungAtlas.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = LungAtlasLogic()


class LungAtlasLogic(ScriptedLoadableModuleLogic):
    """Runs the LungAtlas steps on MRML nodes through the core package."""


class LungAtlasTest(ScriptedLoadableModuleTest):
    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_label_table()

    def test_label_table(self):
        from LungAtlasLib.labels import LABELS
        self.assertEqual(LABELS.lobe_values, (1, 2, 3, 4, 5))
