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
    """Choose inputs, backends and executor; Start runs the cohort in a background process
    (the GUI stays responsive), Stop kills it (finished cases are kept: the run resumes),
    a timer refreshes progress and the per-case status table from the case records."""

    def setup(self):
        import qt

        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/LungAtlasBatch.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = LungAtlasBatchLogic()
        self._process = None
        self._statusTable = None
        self.ui.segmenterComboBox.addItems(["totalsegmentator", "classical", "precomputed"])
        self.ui.registrationComboBox.addItems(["unigradicon", "classical"])
        self.ui.executorComboBox.addItems(["local", "dask scheduler"])
        self.ui.startButton.connect("clicked(bool)", self.onStart)
        self.ui.stopButton.connect("clicked(bool)", self.onStop)
        self.ui.reportButton.connect("clicked(bool)", self.onOpenReport)
        self.ui.executorComboBox.connect("currentIndexChanged(int)", self.onExecutorChanged)
        self.ui.stopButton.enabled = False
        self.onExecutorChanged()
        self._timer = qt.QTimer()
        self._timer.setInterval(2000)
        self._timer.connect("timeout()", self.refreshStatus)

    def cleanup(self):
        self._timer.stop()
        if self._process is not None:
            self._process.cancel()

    def onExecutorChanged(self, index=None):
        dask = self.ui.executorComboBox.currentText == "dask scheduler"
        self.ui.schedulerLineEdit.enabled = dask
        self.ui.workersSpinBox.enabled = not dask

    def _arguments(self):
        return self.logic.buildArguments(
            output=self.ui.outputPathLineEdit.currentPath, source=self.ui.inputPathLineEdit.currentPath,
            nlstTables=self.ui.nlstPathLineEdit.currentPath or None, segmenter=self.ui.segmenterComboBox.currentText,
            registration=self.ui.registrationComboBox.currentText,
            template=self.ui.templatePathLineEdit.currentPath or None,
            scheduler=(self.ui.schedulerLineEdit.text.strip()
                       if self.ui.executorComboBox.currentText == "dask scheduler" else None),
            workers=self.ui.workersSpinBox.value)

    def onStart(self):
        with slicer.util.tryWithErrorDisplay("Could not start the cohort run.", waitCursor=True):
            arguments = self._arguments()
            self.ui.logTextEdit.clear()
            self._process = self.logic.start(arguments, waitForCompletion=False,
                                             logCallback=self.ui.logTextEdit.appendPlainText,
                                             completedCallback=self.onFinished)
            self.ui.startButton.enabled = False
            self.ui.stopButton.enabled = True
            self.ui.statusLabel.text = "Running..."
            self._timer.start()

    def onStop(self):
        if self._process is not None:
            self._process.cancel()

    def onFinished(self, result):
        self._timer.stop()
        self.refreshStatus()
        self._process = None
        self.ui.startButton.enabled = True
        self.ui.stopButton.enabled = False
        self.ui.statusLabel.text = self.logic.describeResult(result)

    def refreshStatus(self):
        output = self.ui.outputPathLineEdit.currentPath
        try:
            progress = self.logic.progress(output)
            self._statusTable = self.logic.caseStatusTable(output, self._statusTable)
        except Exception as exc:  # no cases indexed yet
            self.ui.statusLabel.text = str(exc)
            return
        self.ui.progressBar.setValue(int(progress["percent"]))
        self.ui.statusTableView.setMRMLTableNode(self._statusTable)

    def onOpenReport(self):
        import qt

        with slicer.util.tryWithErrorDisplay("No report to open.", waitCursor=False):
            path = self.logic.reportPath(self.ui.outputPathLineEdit.currentPath)
            qt.QDesktopServices.openUrl(qt.QUrl.fromLocalFile(str(path)))


class LungAtlasBatchLogic(ScriptedLoadableModuleLogic):
    """Runs the cohort engine of LungAtlasLib: in this process (``run``, the headless entry)
    or in a background process (``start``, the GUI and tests), and reads a run folder's
    progress, per-case status and report. No Qt."""

    STATUS_COLUMNS = ["case_id", "status", "failed_stage", "error"]

    def buildArguments(self, output, source, nlstTables=None, segmenter=None, registration=None, template=None,
                       scheduler=None, workers=None, plugins=()):
        """``lungatlas run`` arguments. ``source``: a DICOM tree (folder) or a manifest (CSV of image
        paths); ``scheduler``: a Dask scheduler address, else ``workers`` local processes."""
        from pathlib import Path

        if not output:
            raise ValueError("choose an output folder (the run folder; reusing it resumes the run)")
        arguments = ["run", "--out", str(output)]
        if source:
            source = Path(source)
            if not source.exists():
                raise ValueError(f"input {source} does not exist: choose a DICOM folder or a manifest CSV")
            arguments += ["--dicom" if source.is_dir() else "--manifest", str(source)]
        if nlstTables:
            arguments += ["--nlst-tables", str(nlstTables)]
        if segmenter:
            arguments += ["--segmenter", segmenter]
        if registration:
            arguments += ["--registration", registration]
        if template:
            arguments += ["--template", str(template)]
        if scheduler:
            arguments += ["--scheduler", scheduler]
        elif workers:
            arguments += ["--workers", str(int(workers))]
        for plugin in plugins:
            arguments += ["--plugin", plugin]
        return arguments + ["--no-progress"]

    def start(self, arguments, waitForCompletion=False, logCallback=None, completedCallback=None, env=None):
        """Run ``lungatlas ARGUMENTS`` in a background process (Slicer's Python, the core's ``cli.main``);
        returns the :class:`LungAtlasMRML.process.BackgroundProcess` (``cancel()`` stops it)."""
        from LungAtlasMRML.process import BackgroundProcess, python_executable

        # Not `-m LungAtlasLib.cli`: run as __main__, cli's UserError would be a second class that the
        # commands' errors are not instances of (a traceback and exit 1 instead of a message and exit 2).
        entry = "import sys; from LungAtlasLib.cli import main; sys.exit(main(sys.argv[1:]))"
        process = BackgroundProcess([python_executable(), "-c", entry, *arguments], env=env,
                                    logCallback=logCallback, completedCallback=completedCallback)
        return process.start(waitForCompletion=waitForCompletion)

    def progress(self, output) -> dict:
        """Finished (done or failed) cases over all indexed cases, from the records."""
        from LungAtlasLib.cohort.pipeline import status

        info = status(output)
        finished = info["counts"].get("done", 0) + info["counts"].get("failed", 0)
        return {"cases": info["cases"], "counts": info["counts"],
                "percent": 100.0 * finished / info["cases"] if info["cases"] else 0.0}

    def caseStatusTable(self, output, tableNode=None):
        """Table node with one row per case: id, status (done/failed/pending), failed stage, error."""
        from LungAtlasLib.cohort import records
        from LungAtlasLib.cohort.pipeline import load_cases
        from LungAtlasMRML import bridge

        cases = [c["case_id"] for c in load_cases(output)]
        table = records.cohort_table(output, cases)
        rows = [] if table.empty else table.reindex(columns=self.STATUS_COLUMNS).astype(object).where(
            table.reindex(columns=self.STATUS_COLUMNS).notna(), None).to_dict("records")
        return bridge.rows_to_table_node(rows, name="LungAtlas cohort status", node=tableNode,
                                         columns=self.STATUS_COLUMNS)

    def reportPath(self, output):
        """The run folder's HTML report (newest), or an error saying how to make one."""
        from pathlib import Path

        reports = sorted(Path(output).glob("**/*.html"), key=lambda p: p.stat().st_mtime)
        if not reports:
            raise FileNotFoundError(f"no HTML report under {output}: finish the run, or run "
                                    f"`lungatlas report --out {output}`")
        return reports[-1]

    def describeResult(self, result) -> str:
        if result.cancelled:
            return "Stopped; finished cases are kept (Start resumes)."
        return {0: "All cases finished.", 1: "Finished; some cases failed (see the table).",
                2: "Bad input: " + (result.log[-1] if result.log else "")}.get(
            result.returncode, f"Stopped with exit status {result.returncode}; see the log.")

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
