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

    def run(self, argv, clearScenePerCase=True):
        """Run a ``lungatlas`` command line (``index``/``run``/``status``/``retry``/``report``/``demo``)
        in this process; returns its exit status (1 when any case failed, 2 for bad input).

        With ``clearScenePerCase``, the MRML scene is cleared as each case ends, so that a
        long headless batch does not grow in memory with nodes a case left behind."""
        from LungAtlasLib.cli import main
        from LungAtlasLib.cohort import pipeline

        def clearScene(caseId, status, value):
            scene = getattr(slicer, "mrmlScene", None)
            if scene is not None:
                scene.Clear(0)

        if not clearScenePerCase:
            return main(argv)
        with pipeline.case_listener(clearScene):
            return main(argv)


class LungAtlasBatchTest(ScriptedLoadableModuleTest):
    def runTest(self):
        from LungAtlasLib.cli import build_parser
        self.assertIn("demo", build_parser().format_help())


def _ensureCoreImportable():
    """``--python-script`` runs this file before Slicer's module paths may hold LungAtlasLib:
    look next to this file (installed extension) and in ../LungAtlas (source tree)."""
    import importlib.util
    import os

    if importlib.util.find_spec("LungAtlasLib") is not None:
        return
    here = os.path.dirname(os.path.abspath(__file__))
    for folder in (here, os.path.join(os.path.dirname(here), "LungAtlas")):
        if os.path.isdir(os.path.join(folder, "LungAtlasLib")):
            sys.path.insert(0, folder)
            return


def main(argv):
    """Headless entry: ``Slicer --no-splash --no-main-window --python-script LungAtlasBatch.py ARGS``.

    Runs the same code as ``lungatlas ARGS`` and exits Slicer with its status: 0 when every
    case finished, 1 when any case failed, 2 for bad arguments or input; an unexpected
    error prints its traceback and exits 3. Never a silent 0: Slicer does not exit on its own.
    """
    import traceback

    _ensureCoreImportable()
    try:
        code = LungAtlasBatchLogic().run(list(argv))
    except SystemExit as exc:  # argparse: --help (0) or bad arguments (2)
        code = exc.code if isinstance(exc.code, int) else 2
    except Exception:
        traceback.print_exc()
        code = 3
    slicer.util.exit(int(code))
    return int(code)


if __name__ == "__main__":
    main(sys.argv[1:])
