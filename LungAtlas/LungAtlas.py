"""LungAtlas: interactive Slicer module (one loaded chest CT: segment, register, inspect, nodules, atlas).

Shape of a Slicer 5 scripted module: module, widget (all Qt lives there), logic
(Qt-free: it runs in the Slicer application and under the PyPI ``slicer-core``
package in plain Python, which is how CI tests it), and a self-test for real
Slicer. The science is in the Slicer-free core package ``LungAtlasLib``; the
conversions between its types and MRML nodes are in ``LungAtlasMRML.bridge``;
long steps (segmentation, registration) run in a background process
(``LungAtlasMRML.process``) so that the GUI never freezes and Cancel works.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import slicer
import vtk
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)

try:  # the Slicer application; slicer-core has neither of these
    from slicer.i18n import tr as _
except ImportError:  # pragma: no cover - plain Python
    def _(text):
        return text

try:
    from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
    from typing import Annotated
except ImportError:  # slicer-core: the logic works on the raw parameter node
    parameterNodeWrapper = None

SEGMENTATION_BACKENDS = ["totalsegmentator", "classical", "precomputed"]
SEGMENTATION_MODES = ["fast", "fastest", "full"]
REGISTRATION_BACKENDS = ["unigradicon", "classical"]
DEVICES = ["cpu", "gpu"]

# Python packages a backend needs, with the versions this project is tested with
# (requirements/constraints.txt). Installed only after the user agrees, never in testing mode.
BACKEND_PACKAGES = {
    "totalsegmentator": ["TotalSegmentator==2.18.0"],   # torch and nnunetv2 come from the PyTorch / NNUNet extensions
    "unigradicon": ["unigradicon==1.0.6", "icon_registration==1.1.9", "itk==5.4.7"],
    "classical": ["antspyx==0.6.3"],
}
# pip installs TotalSegmentator without its dependencies: its fury pin would replace Slicer's VTK.
NO_DEPS_PACKAGES = {"TotalSegmentator"}

# Atlas bundle files, first match wins (see docs/slicer.md and the atlas builder's atlas.json).
# The template CT and lobe map of an atlas bundle are found by the core
# (LungAtlasLib.nodules.atlas_stats.find_atlas_files: atlas.json, else known names);
# the density map is optional here.
ATLAS_DENSITY_NAMES = ["nodule_density_all.nii.gz", "maps/nodule_density_all.nii.gz", "nodule_density_all.nrrd"]


class LungAtlasError(RuntimeError):
    """A LungAtlas step could not be done; the message says why and what to do next."""


class MissingWeightsError(LungAtlasError):
    """The backend's model weights are not where it looks; the message says where to put them."""


class MissingPackagesError(LungAtlasError):
    def __init__(self, backend: str, module: str, requirements: list[str]):
        self.backend = backend
        self.module = module
        self.requirements = requirements
        super().__init__(f"backend {backend!r} needs the Python package providing {module!r} "
                         f"({', '.join(requirements) or 'see docs/slicer.md'})")


#
# LungAtlas
#
class LungAtlas(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("LungAtlas")
        self.parent.categories = ["Quantification"]
        self.parent.dependencies = []
        self.parent.contributors = ["LungAtlas developers"]
        self.parent.helpText = _(
            "Segment the lungs and lobes of a chest CT, register it to the lung atlas, measure alignment, "
            "map nodules into atlas space and view the nodule atlas. "
            '<a href="https://github.com/lungatlas/SlicerLungAtlas/blob/main/docs/slicer.md">User guide</a>.')
        self.parent.acknowledgementText = _("Uses TotalSegmentator and uniGradICON; built on 3D Slicer.")


#
# Parameter node
#
if parameterNodeWrapper is not None:
    @parameterNodeWrapper
    class LungAtlasParameterNode:
        """User choices of the LungAtlas module, saved with the scene."""

        inputVolume: slicer.vtkMRMLScalarVolumeNode
        segmentationBackend: Annotated[str, Choice(SEGMENTATION_BACKENDS)] = "totalsegmentator"
        segmentationMode: Annotated[str, Choice(SEGMENTATION_MODES)] = "fast"
        device: Annotated[str, Choice(DEVICES)] = "cpu"
        outputSegmentation: slicer.vtkMRMLSegmentationNode
        atlasFolder: Path
        registrationBackend: Annotated[str, Choice(REGISTRATION_BACKENDS)] = "unigradicon"
        ioSteps: Annotated[int, WithinRange(0, 200)] = 0
        outputTransform: slicer.vtkMRMLTransformNode
        resampledVolume: slicer.vtkMRMLScalarVolumeNode
        metricsTable: slicer.vtkMRMLTableNode
        noduleMarkups: slicer.vtkMRMLMarkupsFiducialNode
        nlstTable: Path
        participantId: str = ""
        densityOpacity: Annotated[float, WithinRange(0.0, 1.0)] = 0.6
else:
    LungAtlasParameterNode = None


#
# LungAtlasWidget
#
class LungAtlasWidget(ScriptedLoadableModuleWidget):
    """GUI: each button calls one logic method; long steps show progress and turn into Cancel."""

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        from slicer.util import VTKObservationMixin

        self._observer = VTKObservationMixin()
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._run = None

    def setup(self):
        import qt

        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/LungAtlas.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = LungAtlasLogic()

        for combo, items in ((self.ui.segmentationBackendComboBox, SEGMENTATION_BACKENDS),
                             (self.ui.segmentationModeComboBox, SEGMENTATION_MODES),
                             (self.ui.deviceComboBox, DEVICES),
                             (self.ui.registrationBackendComboBox, REGISTRATION_BACKENDS)):
            if combo.count == 0:
                combo.addItems(items)
        self.ui.colorMapComboBox.addItems(["PET-Heat", "Iron", "Rainbow", "fMRI"])

        self._observer.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self._observer.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.segmentButton.connect("clicked(bool)", self.onSegment)
        self.ui.registerButton.connect("clicked(bool)", self.onRegister)
        self.ui.metricsButton.connect("clicked(bool)", self.onMetrics)
        self.ui.mapNodulesButton.connect("clicked(bool)", self.onMapNodules)
        self.ui.importNlstButton.connect("clicked(bool)", self.onImportNlst)
        self.ui.showAtlasButton.connect("clicked(bool)", self.onShowAtlas)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancel)
        self.ui.densityOpacitySliderWidget.connect("valueChanged(double)", self.onOpacityChanged)
        self.ui.colorMapComboBox.connect("currentIndexChanged(int)", lambda index: self.onOpacityChanged())
        self.ui.cancelButton.enabled = False
        self.ui.progressBar.setValue(0)
        self.initializeParameterNode()

    def cleanup(self):
        if self._run is not None:
            self._run.cancel()
        self._observer.removeObservers()

    def enter(self):
        self.initializeParameterNode()

    def exit(self):
        if self._parameterNode and self._parameterNodeGuiTag is not None:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None

    def onSceneStartClose(self, caller, event):
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event):
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self):
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            first = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if first:
                self._parameterNode.inputVolume = first

    def setParameterNode(self, parameterNode):
        if self._parameterNode and self._parameterNodeGuiTag is not None:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
        self._parameterNode = parameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)

    # -- long steps ----------------------------------------------------
    def _setBusy(self, busy: bool, message: str = ""):
        for button in (self.ui.segmentButton, self.ui.registerButton, self.ui.metricsButton,
                       self.ui.mapNodulesButton, self.ui.importNlstButton, self.ui.showAtlasButton):
            button.enabled = not busy
        self.ui.cancelButton.enabled = busy
        self.ui.statusLabel.text = message
        if busy:
            self.ui.progressBar.setValue(0)

    def _onProgress(self, percent, message):
        self.ui.progressBar.setValue(int(percent))
        self.ui.statusLabel.text = message

    def _onLog(self, text):
        self.ui.logTextEdit.appendPlainText(text)

    def _onDone(self, outcome):
        self._run = None
        self._setBusy(False, outcome.message)
        if outcome.error:
            slicer.util.errorDisplay(outcome.error, windowTitle=_("LungAtlas"))
            return
        self.ui.progressBar.setValue(100)
        if outcome.kind == "segment":
            self._parameterNode.outputSegmentation = outcome.nodes["segmentation"]
            self.ui.qcLabel.text = outcome.summary
        elif outcome.kind == "register":
            self._parameterNode.outputTransform = outcome.nodes["transform"]
            self._parameterNode.resampledVolume = outcome.nodes["resampled"]
            slicer.util.setSliceViewerLayers(background=outcome.nodes["resampled"], fit=True)

    def _ensureBackendReady(self, step: str, backend: str) -> bool:
        """Missing packages: ask, then install; missing weights: say where to put them."""
        try:
            self.logic.checkBackend(step, backend)
            return True
        except MissingPackagesError as exc:
            if slicer.app.testingEnabled():
                raise
            question = _("{error}\n\nInstall now with pip? This downloads packages; "
                         "Slicer may need a restart afterwards.").format(error=exc)
            if not slicer.util.confirmOkCancelDisplay(question, windowTitle=_("LungAtlas: missing packages")):
                return False
            with slicer.util.tryWithErrorDisplay(_("Installing packages failed."), waitCursor=True):
                self.logic.installPackages(exc.requirements)
            self.logic.checkBackend(step, backend)
            return True
        except MissingWeightsError as exc:
            slicer.util.errorDisplay(str(exc), windowTitle=_("LungAtlas: model weights missing"))
            return False

    def onSegment(self):
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("Segmentation failed to start."), waitCursor=True):
            if not self._ensureBackendReady("segment", p.segmentationBackend):
                return
            self._setBusy(True, _("Segmenting..."))
            self._run = self.logic.segment(p.inputVolume, backend=p.segmentationBackend, mode=p.segmentationMode,
                                           device=p.device, waitForCompletion=False,
                                           progressCallback=self._onProgress, logCallback=self._onLog,
                                           completedCallback=self._onDone)

    def onRegister(self):
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("Registration failed to start."), waitCursor=True):
            if not self._ensureBackendReady("register", p.registrationBackend):
                return
            self._setBusy(True, _("Registering to the atlas..."))
            self._run = self.logic.register(p.inputVolume, p.outputSegmentation, str(p.atlasFolder),
                                            backend=p.registrationBackend, ioSteps=p.ioSteps, device=p.device,
                                            waitForCompletion=False, progressCallback=self._onProgress,
                                            logCallback=self._onLog, completedCallback=self._onDone)

    def onCancel(self):
        if self._run is not None:
            self._run.cancel()

    def onMetrics(self):
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("Computing metrics failed."), waitCursor=True):
            table, chart = self.logic.computeMetrics(p.inputVolume, p.outputSegmentation, p.outputTransform,
                                                     str(p.atlasFolder))
            p.metricsTable = table
            self.logic.showChart(chart)

    def onMapNodules(self):
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("Mapping nodules failed."), waitCursor=True):
            self.logic.mapNodulesToAtlas(p.noduleMarkups, p.outputTransform)

    def onImportNlst(self):
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("Importing NLST abnormalities failed."), waitCursor=True):
            p.noduleMarkups = self.logic.importNlstAbnormalities(str(p.nlstTable), p.participantId, p.inputVolume,
                                                                 p.outputSegmentation)

    def onShowAtlas(self):
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("Showing the atlas failed."), waitCursor=True):
            self.logic.showAtlas(str(p.atlasFolder), opacity=p.densityOpacity,
                                 colorMap=self.ui.colorMapComboBox.currentText)

    def onOpacityChanged(self, value=None):
        density = self.logic.atlasNodes.get("density") if self.logic else None
        if density is not None:
            self.logic.setDensityDisplay(density, opacity=self.ui.densityOpacitySliderWidget.value,
                                         colorMap=self.ui.colorMapComboBox.currentText)


#
# LungAtlasLogic
#
@dataclass
class StepOutcome:
    """What a long step left: nodes (on success), or the error text; ``message`` for the status line."""

    kind: str
    nodes: dict
    error: str = ""
    message: str = ""
    summary: str = ""
    workDir: str = ""


class StepRun:
    """A running background step: ``cancel()``; the outcome arrives through ``completedCallback``."""

    def __init__(self, process, kind):
        self.process = process
        self.kind = kind
        self.outcome: StepOutcome | None = None

    def cancel(self):
        self.process.cancel()

    def isRunning(self):
        return self.process.isRunning()


class LungAtlasLogic(ScriptedLoadableModuleLogic):
    """The LungAtlas steps on MRML nodes, through the core package. No Qt.

    Every step either leaves its output nodes complete in the scene or, on
    failure or cancel, leaves the scene as it was and raises (or reports)
    a :class:`LungAtlasError` that says what to do.
    """

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)
        self.plugins: list[str] = []           # modules the runner imports first (extra backends)
        self.environment: dict[str, str] = {}  # extra environment for the runner process
        self.keepWorkDirectories = False
        self.atlasNodes: dict = {}

    def getParameterNode(self):
        node = ScriptedLoadableModuleLogic.getParameterNode(self)
        return LungAtlasParameterNode(node) if LungAtlasParameterNode is not None else node

    # -- input -----------------------------------------------------------
    def loadCT(self, path, name: str | None = None):
        """Read a CT (NIfTI, NRRD, MHA or a DICOM series folder) into a new volume node."""
        from LungAtlasLib.io import read_image
        from LungAtlasMRML import bridge

        image = read_image(path)
        node = bridge.image_to_volume_node(image, name or _node_name_from_path(path))
        node.SetAttribute("LungAtlas.source", str(path))
        self.checkCT(node)
        return node

    def checkCT(self, volumeNode):
        """The node's image (SimpleITK, LPS) if it looks like a CT in HU; LungAtlasError otherwise."""
        from LungAtlasMRML import bridge

        if volumeNode is None:
            raise LungAtlasError(_("No input volume selected: choose a chest CT in 'Input CT'."))
        try:
            image = bridge.volume_node_to_image(volumeNode)
        except ValueError as exc:
            raise LungAtlasError(str(exc)) from None
        array = slicer.util.arrayFromVolume(volumeNode)
        # A chest CT in Hounsfield units holds air (about -1000 HU) around and inside the body;
        # MR, PET or normalised images do not reach that far below zero.
        low = float(np.percentile(array, 1))
        if low > -700 or array.max() > 40000:
            raise LungAtlasError(_("{name} does not look like a CT in Hounsfield units (1st percentile {low:.0f}, "
                                   "max {high:.0f}); LungAtlas needs a chest CT.").format(
                name=volumeNode.GetName(), low=low, high=float(array.max())))
        return image

    # -- backends ----------------------------------------------------------
    def checkBackend(self, step: str, backend: str) -> None:
        """Raise MissingPackagesError / MissingWeightsError before a step starts (cheap checks only)."""
        from LungAtlasLib.registration import RegistrationError, get_registration
        from LungAtlasLib.segmentation import SegmentationError, get_segmenter

        getter = get_segmenter if step == "segment" else get_registration
        try:
            instance = getter(backend)
            instance.check_ready()
        except ModuleNotFoundError as exc:
            raise MissingPackagesError(backend, exc.name or str(exc), BACKEND_PACKAGES.get(backend, [])) from None
        except (SegmentationError, RegistrationError) as exc:
            text = str(exc)
            if "weight" in text.lower():
                raise MissingWeightsError(text) from None
            raise LungAtlasError(text) from None
        except TypeError:
            return  # the backend needs options to construct; it checks itself in the runner

    def installPackages(self, requirements: list[str]) -> None:
        """pip-install pinned packages into Slicer's Python (only after the user agreed; never in tests)."""
        app = getattr(slicer, "app", None)
        if app is None or app.testingEnabled():
            raise LungAtlasError(_("Packages are installed only interactively: {packages}").format(
                packages=", ".join(requirements)))
        for requirement in requirements:
            name = requirement.split("==")[0]
            slicer.util.pip_install(("--no-deps " if name in NO_DEPS_PACKAGES else "") + requirement)

    # -- running steps -----------------------------------------------------
    def _workDir(self, step: str) -> Path:
        return Path(tempfile.mkdtemp(prefix=f"LungAtlas-{step}-"))

    def _start(self, kind: str, command: list[str], workDir: Path, importResults: Callable[[Path], StepOutcome],
               waitForCompletion: bool, progressCallback=None, logCallback=None, completedCallback=None):
        from LungAtlasMRML.process import BackgroundProcess

        run = None

        def finished(result):
            if result.cancelled:
                outcome = StepOutcome(kind, {}, error=_("{kind} was cancelled; nothing was added to the scene.")
                                      .format(kind=kind.capitalize()), message=_("Cancelled"))
            elif not result.succeeded:
                detail = result.error or "\n".join(result.log[-15:])
                outcome = StepOutcome(kind, {}, error=_("{kind} failed (exit status {code}): {detail}").format(
                    kind=kind.capitalize(), code=result.returncode, detail=detail), message=_("Failed"))
            else:
                try:
                    outcome = importResults(workDir)
                except Exception as exc:
                    logging.exception("LungAtlas: importing %s results failed", kind)
                    outcome = StepOutcome(kind, {}, error=_("{kind}: reading the results failed: {error}").format(
                        kind=kind.capitalize(), error=exc), message=_("Failed"))
            outcome.workDir = str(workDir)
            if not self.keepWorkDirectories and not outcome.error:
                shutil.rmtree(workDir, ignore_errors=True)
            run.outcome = outcome
            if completedCallback:
                completedCallback(outcome)

        process = BackgroundProcess(command, env=self.environment, logCallback=logCallback,
                                    progressCallback=progressCallback, completedCallback=finished)
        run = StepRun(process, kind)
        process.start(waitForCompletion=waitForCompletion)
        if not waitForCompletion:
            return run
        if run.outcome.error:
            raise LungAtlasError(run.outcome.error)
        return run.outcome

    # -- segment -----------------------------------------------------------
    def segment(self, volumeNode, backend: str = "totalsegmentator", mode: str | None = "fast",
                device: str | None = "cpu", outputSegmentation=None, waitForCompletion: bool = True,
                progressCallback=None, logCallback=None, completedCallback=None):
        """Lungs and lobes of ``volumeNode`` -> segmentation node (segments named and coloured from the label
        table; QC flags in the node's ``LungAtlas.qc`` attribute).

        ``waitForCompletion``: return the segmentation node (raise LungAtlasError on failure);
        else return a :class:`StepRun` and report a :class:`StepOutcome` to ``completedCallback``.
        """
        from LungAtlasLib.io import write_image
        from LungAtlasMRML.process import runner_command

        image = self.checkCT(volumeNode)
        workDir = self._workDir("segment")
        ctPath = write_image(image, workDir / "ct.nrrd")
        arguments = ["--ct", str(ctPath), "--backend", backend, "--out", str(workDir / "out"),
                     "--case-id", volumeNode.GetName()]
        if mode:
            arguments += ["--mode", mode]
        if device:
            arguments += ["--device", device]
        command = runner_command("segment", *arguments, plugins=self.plugins)

        def importResults(folder: Path) -> StepOutcome:
            from LungAtlasLib.io import read_label_map
            from LungAtlasMRML import bridge

            out = folder / "out"
            result = json.loads((out / "result.json").read_text())
            labels = read_label_map(out / "labels.nii.gz")
            node = bridge.label_map_to_segmentation_node(
                labels, result["kind"], name=f"{volumeNode.GetName()} lungs", node=outputSegmentation,
                reference_volume_node=volumeNode)
            node.SetAttribute("LungAtlas.backend", result["backend"])
            node.SetAttribute("LungAtlas.qc", json.dumps(result.get("qc", {})))
            summary = qcSummary(result.get("qc", {}))
            return StepOutcome("segment", {"segmentation": node}, message=_("Segmentation done"), summary=summary)

        outcome = self._start("segment", command, workDir, importResults, waitForCompletion,
                              progressCallback, logCallback, completedCallback)
        return outcome.nodes["segmentation"] if waitForCompletion else outcome

    # -- register ------------------------------------------------------------
    def atlasFiles(self, atlasFolder) -> dict[str, Path]:
        """Paths of the atlas bundle's template CT and lobe label map (and density map if present)."""
        if not atlasFolder or not Path(atlasFolder).is_dir():
            raise LungAtlasError(_("Atlas folder {folder} does not exist: choose the folder that holds the atlas "
                                   "bundle (template CT, lobe label map, atlas.json).").format(folder=atlasFolder))
        from LungAtlasLib.nodules.atlas_stats import ATLAS_CT_NAMES, ATLAS_LABEL_NAMES, find_atlas_files

        folder = Path(atlasFolder)
        try:
            template, lobes = find_atlas_files(folder)
            found = {"template": template, "lobes": lobes}
        except FileNotFoundError:
            missing = [f"{role} ({' or '.join(names)})" for role, names in
                       (("template", ATLAS_CT_NAMES), ("lobes", ATLAS_LABEL_NAMES))
                       if not any((folder / n).is_file() for n in names)]
            raise LungAtlasError(_("Atlas folder {folder} is incomplete: missing {missing}.").format(
                folder=atlasFolder, missing="; ".join(missing) or "the files atlas.json names")) from None
        density = next((folder / n for n in ATLAS_DENSITY_NAMES if (folder / n).is_file()), None)
        if density is not None:
            found["density"] = density
        return found

    def register(self, volumeNode, segmentationNode, atlasFolder, backend: str = "unigradicon",
                 ioSteps: int | None = None, device: str | None = "cpu", waitForCompletion: bool = True,
                 progressCallback=None, logCallback=None, completedCallback=None):
        """Register the CT (moving) to the atlas template (fixed).

        Result: a transform node named "<CT> to atlas" whose FromParent is atlas -> patient (so the
        patient CT, its segmentation and nodules placed under it appear in atlas space, see
        LungAtlasMRML.bridge) and a volume node with the CT resampled onto the atlas grid.
        ``waitForCompletion``: returns (transform node, resampled volume node).
        """
        from LungAtlasLib.io import write_image
        from LungAtlasMRML import bridge
        from LungAtlasMRML.process import runner_command

        image = self.checkCT(volumeNode)
        files = self.atlasFiles(atlasFolder)
        workDir = self._workDir("register")
        movingPath = write_image(image, workDir / "moving.nrrd")
        arguments = ["--fixed", str(files["template"]), "--moving", str(movingPath), "--backend", backend,
                     "--out", str(workDir / "out"), "--fixed-labels", str(files["lobes"])]
        if segmentationNode is not None:
            labels, _kind = bridge.segmentation_node_to_label_map(segmentationNode, volumeNode)
            arguments += ["--moving-labels", str(write_image(labels, workDir / "moving_labels.nii.gz"))]
        if ioSteps:
            arguments += ["--io-steps", str(int(ioSteps))]
        if device:
            arguments += ["--device", device]
        command = runner_command("register", *arguments, plugins=self.plugins)

        def importResults(folder: Path) -> StepOutcome:
            import SimpleITK as sitk

            from LungAtlasLib.io import read_image

            out = folder / "out"
            result = json.loads((out / "result.json").read_text())
            template = read_image(files["template"])
            fixedToMoving = sitk.ReadTransform(str(out / "fixed_to_moving.h5"))
            created = []
            try:
                transformNode = bridge.registration_to_transform_node(
                    fixedToMoving, template, name=f"{volumeNode.GetName()} to atlas")
                created.append(transformNode)
                transformNode.SetAttribute("LungAtlas.backend", result["backend"])
                transformNode.SetAttribute("LungAtlas.atlasFolder", str(atlasFolder))
                warped = read_image(out / "warped.nii.gz")
                resampled = bridge.image_to_volume_node(warped, f"{volumeNode.GetName()} in atlas space")
                created.append(resampled)
            except Exception:
                for node in created:
                    slicer.mrmlScene.RemoveNode(node)
                raise
            return StepOutcome("register", {"transform": transformNode, "resampled": resampled},
                               message=_("Registration done ({seconds:.0f} s)").format(seconds=result["seconds"]))

        outcome = self._start("register", command, workDir, importResults, waitForCompletion,
                              progressCallback, logCallback, completedCallback)
        if not waitForCompletion:
            return outcome
        return outcome.nodes["transform"], outcome.nodes["resampled"]

    # -- metrics -------------------------------------------------------------
    METRIC_COLUMNS = ["region", "dice_before", "dice_after", "relative_volume_difference_before",
                      "relative_volume_difference_after", "hausdorff95_mm_before", "hausdorff95_mm_after",
                      "mse_before", "mse_after"]

    def computeMetrics(self, volumeNode, segmentationNode, transformNode, atlasFolder, tableNode=None):
        """Before/after alignment of the CT's lobes to the atlas lobes, per region -> (table node, chart node).

        "Before": the patient's labels and CT on the atlas grid with no alignment (identity in
        physical space); "after": through the registration. Dice, relative volume difference
        (fraction), HD95 (mm) per region; MSE of intensities windowed to [-1000, 1000] HU scaled to
        [0, 1], over the image and inside the atlas lungs (rows "image", "lung_intensity").
        """
        import SimpleITK as sitk

        from LungAtlasLib.geometry import resample_to
        from LungAtlasLib.io import read_image, read_label_map
        from LungAtlasLib.metrics import alignment_metrics
        from LungAtlasMRML import bridge

        if segmentationNode is None:
            raise LungAtlasError(_("Metrics need the CT's lung segmentation: run Segment first."))
        if transformNode is None:
            raise LungAtlasError(_("Metrics need the registration transform: run Register to atlas first."))
        files = self.atlasFiles(atlasFolder)
        ct = self.checkCT(volumeNode)
        labels, kind = bridge.segmentation_node_to_label_map(segmentationNode, volumeNode)
        atlasCT = read_image(files["template"])
        atlasLabels = read_label_map(files["lobes"])
        if kind == "sides":  # compare like with like: collapse the atlas lobes to sides
            from LungAtlasLib.labels import LABELS

            sides = LABELS.side_map(sitk.GetArrayViewFromImage(atlasLabels))
            atlasLabels = _with_geometry(sides, atlasLabels)
        fixedToMoving = bridge.transform_node_to_sitk(transformNode)
        values = (1, 2) if kind == "sides" else None
        rows = {}
        for stage, transform in (("before", sitk.Transform()), ("after", fixedToMoving)):
            movingLabels = resample_to(labels, atlasLabels, is_label=True, transform=transform)
            movingCT = resample_to(ct, atlasCT, transform=transform)
            for row in alignment_metrics(atlasLabels, movingLabels, atlasCT, movingCT, labels=values):
                region = row["region"]
                if kind == "sides" and region in ("right_upper", "right_middle"):
                    region = {"right_upper": "right_lung", "right_middle": "left_lung"}[region]
                target = rows.setdefault(region, {"region": region})
                for key, value in row.items():
                    if key != "region":
                        target[f"{key}_{stage}"] = value
        table = bridge.rows_to_table_node(list(rows.values()), name=f"{volumeNode.GetName()} alignment metrics",
                                          node=tableNode, columns=self.METRIC_COLUMNS)
        chart = self._diceChart(table, volumeNode.GetName())
        return table, chart

    def _diceChart(self, table, name):
        scene = slicer.mrmlScene
        chart = scene.AddNewNodeByClass("vtkMRMLPlotChartNode", f"{name} Dice before/after")
        chart.SetTitle(_("Dice per region, before and after registration"))
        chart.SetXAxisTitle(_("region"))
        chart.SetYAxisTitle(_("Dice"))
        for column, color in (("dice_before", (0.6, 0.6, 0.6)), ("dice_after", (0.1, 0.5, 0.9))):
            series = scene.AddNewNodeByClass("vtkMRMLPlotSeriesNode", f"{name} {column}")
            series.SetAndObserveTableNodeID(table.GetID())
            series.SetPlotType(slicer.vtkMRMLPlotSeriesNode.PlotTypeBar)
            series.SetLabelColumnName("region")
            series.SetYColumnName(column)
            series.SetColor(*color)
            chart.AddAndObservePlotSeriesNodeID(series.GetID())
        return chart

    def showChart(self, chart):
        """Show the chart in a plot view (Slicer application only)."""
        app = getattr(slicer, "app", None)
        if app is None:
            return
        slicer.app.layoutManager().setLayout(slicer.vtkMRMLLayoutNode.SlicerLayoutFourUpPlotView)
        slicer.modules.plots.logic().ShowChartInLayout(chart)

    # -- nodules -------------------------------------------------------------
    def createNoduleMarkups(self, pointsLps, labels=None, name="Nodules"):
        """A markups point list from nodule centres in patient LPS mm."""
        from LungAtlasMRML import bridge

        return bridge.points_to_markups_node(pointsLps, labels, name=name)

    def mapNodulesToAtlas(self, markupsNode, transformNode, name: str | None = None):
        """A new markups point list with the nodules in atlas space (the patient list is left as it is)."""
        from LungAtlasMRML import bridge

        if markupsNode is None or markupsNode.GetNumberOfControlPoints() == 0:
            raise LungAtlasError(_("No nodule points: place points in 'Nodules' or import NLST rows first."))
        if transformNode is None:
            raise LungAtlasError(_("No registration transform: run Register to atlas first."))
        points, labels = bridge.markups_node_to_points(markupsNode)
        bridge.check_finite(points, markupsNode.GetName())
        atlasNode = bridge.points_to_markups_node(points, labels, name=name or f"{markupsNode.GetName()} in atlas")
        try:
            for i in range(markupsNode.GetNumberOfControlPoints()):
                atlasNode.SetNthControlPointDescription(i, markupsNode.GetNthControlPointDescription(i))
            atlasNode.SetAndObserveTransformNodeID(transformNode.GetID())
            slicer.vtkSlicerTransformLogic.hardenTransform(atlasNode)
        except Exception:
            slicer.mrmlScene.RemoveNode(atlasNode)
            raise
        atlasNode.SetAttribute("LungAtlas.space", "atlas")
        return atlasNode

    def importNlstAbnormalities(self, csvPath, participantId, volumeNode, segmentationNode,
                                screeningYear: int | None = None, name: str | None = None):
        """NLST CT-abnormality (ctab) nodule rows of one participant as points in patient space.

        NLST recorded only the lobe and the image number; the core estimates each position as
        the centroid of that lobe in that axial slice of this CT's lobe segmentation
        (``LungAtlasLib.nodules.inputs.estimate_nlst_positions``; uncertainty in mm in each
        point's description). Rows that cannot be placed (code 8 "other", missing slice, lobe
        absent from the slice) are not guessed: they are listed in the node's
        ``LungAtlas.excluded`` attribute (JSON) with the reason.
        ``screeningYear``: 0, 1, 2 for T0/T1/T2; None keeps every year (one CT should be one screen).
        """
        from LungAtlasLib.cohort.nlst import read_abnormalities
        from LungAtlasMRML import bridge

        try:
            from LungAtlasLib.nodules.inputs import estimate_nlst_positions
        except ImportError:
            raise LungAtlasError(_("This LungAtlas build cannot place NLST rows (LungAtlasLib.nodules missing); "
                                   "place the points by hand in the Markups module.")) from None
        if not csvPath or not Path(csvPath).is_file():
            raise LungAtlasError(_("NLST abnormality table {path} not found: choose the CDAS ctab CSV.").format(
                path=csvPath))
        self.checkCT(volumeNode)
        if segmentationNode is None:
            raise LungAtlasError(_("Placing NLST rows needs the lobe segmentation: run Segment first."))
        labels, kind = bridge.segmentation_node_to_label_map(segmentationNode, volumeNode)
        if kind != "lobes":
            raise LungAtlasError(_("NLST rows name lobes; {name} holds only left/right lungs. Segment with a "
                                   "lobe backend (TotalSegmentator).").format(name=segmentationNode.GetName()))
        rows, _problems = read_abnormalities(csvPath)
        rows = rows.rename(columns={"participant_id": "pid"})  # the estimator reads NLST's own column name
        rows = rows[rows["pid"].astype(str) == str(participantId).strip()]
        if screeningYear is not None:
            rows = rows[rows["study_yr"] == int(screeningYear)]
        if rows.empty:
            raise LungAtlasError(_("No nodule rows (sct_ab_desc 51) for participant {pid} in {path}.").format(
                pid=participantId, path=csvPath))
        table = estimate_nlst_positions(rows, labels, case_id=volumeNode.GetName())
        placed = table[table["status"] == "ok"]
        excluded = table[table["status"] != "ok"][["nodule_id", "status", "note"]].to_dict("records")
        points = placed[["x_lps", "y_lps", "z_lps"]].to_numpy(float)
        descriptions = [f"NLST estimate: {note}; uncertainty {u:.0f} mm"
                        for note, u in zip(placed["note"], placed["uncertainty_mm"])]
        node = bridge.points_to_markups_node(points, list(placed["nodule_id"].astype(str)),
                                             name=name or f"NLST {participantId} nodules", descriptions=descriptions)
        node.SetAttribute("LungAtlas.excluded", json.dumps(excluded, default=str))
        return node

    # -- atlas view ----------------------------------------------------------
    def showAtlas(self, atlasFolder, opacity: float = 0.6, colorMap: str = "PET-Heat"):
        """Load the atlas template, its lobe segmentation and the nodule density map; show the density
        over the template with a colour map and opacity. Returns the nodes (dict)."""
        from LungAtlasLib.io import read_image, read_label_map
        from LungAtlasMRML import bridge

        files = self.atlasFiles(atlasFolder)
        created = []
        try:
            template = bridge.image_to_volume_node(read_image(files["template"]), "Atlas template")
            created.append(template)
            lobes = bridge.label_map_to_segmentation_node(read_label_map(files["lobes"]), "lobes",
                                                          name="Atlas lobes", reference_volume_node=template)
            created.append(lobes)
            density = None
            if "density" in files:
                density = bridge.image_to_volume_node(read_image(files["density"], require_ct=False),
                                                      "Atlas nodule density")
                created.append(density)
                self.setDensityDisplay(density, opacity=opacity, colorMap=colorMap)
        except Exception:
            for node in created:
                slicer.mrmlScene.RemoveNode(node)
            raise
        lobes.GetDisplayNode().SetOpacity2DFill(0.15)
        self.atlasNodes = {"template": template, "lobes": lobes, "density": density}
        self._showInSliceViews(template, density, opacity)
        return self.atlasNodes

    def setDensityDisplay(self, densityNode, opacity: float = 0.6, colorMap: str = "PET-Heat"):
        """Colour map over the map's range, zero transparent (threshold), opacity in the slice views."""
        display = densityNode.GetDisplayNode()
        color = slicer.mrmlScene.GetFirstNodeByName(colorMap)
        if color is None:
            raise LungAtlasError(_("Colour map {name} not found").format(name=colorMap))
        display.SetAndObserveColorNodeID(color.GetID())
        high = float(slicer.util.arrayFromVolume(densityNode).max())
        display.AutoWindowLevelOff()
        display.SetWindowLevelMinMax(0.0, high if high > 0 else 1.0)
        display.ApplyThresholdOn()
        display.SetLowerThreshold(high * 0.02)   # hide the empty background, keep every visible density
        display.SetUpperThreshold(high * 10 + 1)
        densityNode.SetAttribute("LungAtlas.opacity", str(opacity))
        self._showInSliceViews(None, densityNode, opacity)

    def _showInSliceViews(self, background, foreground, opacity):
        for i in range(slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode")):
            composite = slicer.mrmlScene.GetNthNodeByClass(i, "vtkMRMLSliceCompositeNode")
            if background is not None:
                composite.SetBackgroundVolumeID(background.GetID())
            if foreground is not None:
                composite.SetForegroundVolumeID(foreground.GetID())
                composite.SetForegroundOpacity(opacity)


def qcSummary(qc: dict) -> str:
    """One line for the GUI: passed, or the failed checks with their reasons."""
    if not qc:
        return _("QC: not reported by the backend")
    failed = [f for f in qc.get("flags", []) if not f.get("passed", True)]
    if not failed:
        return _("QC: all checks passed")
    return _("QC: ") + "; ".join(f"{f.get('check', '?')}: {f.get('reason', '')}" for f in failed)


def _node_name_from_path(path) -> str:
    name = Path(path).name
    for suffix in (".nii.gz", ".seg.nrrd", ".nii", ".nrrd", ".mha", ".mhd"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _with_geometry(array, reference):
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(array)
    image.CopyInformation(reference)
    return image


#
# LungAtlasTest (real Slicer: Developer mode > Reload and Test, or ctest)
#
class LungAtlasTest(ScriptedLoadableModuleTest):
    """Self-test in the Slicer application: the logic on a phantom chest, no model weights needed."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_label_table()
        self.test_bridge_round_trip()
        self.test_metrics_and_atlas_view()

    def test_label_table(self):
        from LungAtlasLib.labels import LABELS

        self.assertEqual(LABELS.lobe_values, (1, 2, 3, 4, 5))

    def test_bridge_round_trip(self):
        import SimpleITK as sitk

        from LungAtlasLib import phantom
        from LungAtlasMRML import bridge

        subject = phantom.make_subject(seed=3, spacing_mm=8.0, n_nodules=1)
        volume = bridge.image_to_volume_node(subject.ct, "phantom CT")
        back = bridge.volume_node_to_image(volume)
        self.assertEqual(back.GetSize(), subject.ct.GetSize())
        self.assertTrue(np.allclose(back.GetOrigin(), subject.ct.GetOrigin()))
        segmentation = bridge.label_map_to_segmentation_node(subject.labels, "lobes", reference_volume_node=volume)
        self.assertEqual(segmentation.GetSegmentation().GetNumberOfSegments(), 5)
        labels, kind = bridge.segmentation_node_to_label_map(segmentation, volume)
        self.assertEqual(kind, "lobes")
        self.assertTrue(np.array_equal(sitk.GetArrayViewFromImage(labels), sitk.GetArrayViewFromImage(subject.labels)))
        self.delayDisplay("bridge round trip passed")

    def test_metrics_and_atlas_view(self):
        import SimpleITK as sitk

        from LungAtlasLib import phantom
        from LungAtlasLib.io import write_image
        from LungAtlasMRML import bridge

        atlas = phantom.make_atlas_subject(spacing_mm=8.0)
        folder = Path(tempfile.mkdtemp(prefix="LungAtlasSelfTest-"))
        write_image(atlas.ct, folder / "template.nii.gz")
        write_image(atlas.labels, folder / "template_lobes.nii.gz")
        logic = LungAtlasLogic()
        volume = bridge.image_to_volume_node(atlas.ct, "atlas as patient")
        segmentation = bridge.label_map_to_segmentation_node(atlas.labels, "lobes", reference_volume_node=volume)
        identity = bridge.transform_to_node(sitk.AffineTransform(3), name="identity")
        table, _chart = logic.computeMetrics(volume, segmentation, identity, str(folder))
        rows = {r["region"]: r for r in bridge.table_node_to_rows(table)}
        self.assertAlmostEqual(rows["lung"]["dice_after"], 1.0, places=6)  # the atlas against itself
        nodes = logic.showAtlas(str(folder))
        self.assertIsNotNone(nodes["template"])
        shutil.rmtree(folder, ignore_errors=True)
        self.delayDisplay("metrics and atlas view passed")
