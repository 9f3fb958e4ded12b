"""LungAtlasBatch: run LungAtlas on a whole cohort, in Slicer or headless.

Headless: ``Slicer --no-splash --no-main-window --python-script LungAtlasBatch/LungAtlasBatch.py ARGS``
takes the same arguments as the ``lungatlas`` command line.
"""
import sys

import slicer
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)


class LungAtlasBatch(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "LungAtlas Batch"
        self.parent.categories = ["Quantification"]
        self.parent.dependencies = ["LungAtlas"]
        self.parent.contributors = ["LungAtlas developers"]
        self.parent.helpText = "Run the LungAtlas pipeline on a cohort (DICOM tree or manifest), locally or on Dask."
        self.parent.acknowledgementText = "Built on 3D Slicer."


class LungAtlasBatchWidget(ScriptedLoadableModuleWidget):
    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/LungAtlasBatch.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        self.logic = LungAtlasBatchLogic()


class LungAtlasBatchLogic(ScriptedLoadableModuleLogic):
    """Runs the cohort engine of LungAtlasLib."""

    def run(self, argv):
        from LungAtlasLib.cli import main
        return main(argv)


class LungAtlasBatchTest(ScriptedLoadableModuleTest):
    def runTest(self):
        from LungAtlasLib.cli import build_parser
        self.assertIn("demo", build_parser().format_help())


def main(argv):
    """Headless entry: exit status is the command's (non-zero when any case failed)."""
    code = LungAtlasBatchLogic().run(argv)
    slicer.util.exit(code)


if __name__ == "__main__":
    main(sys.argv[1:])
