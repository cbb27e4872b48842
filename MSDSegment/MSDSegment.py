"""MSDSegment: segment the liver, spleen and pancreas in CT and the prostate zones in MR with bundled U-Nets.

The classes here are thin: the engine (MSDSegmentLib) does the segmentation without Qt or Slicer,
and MSDSegmentLib.mrml turns volume nodes into a segmentation node. Importing this file must stay
cheap: torch and MONAI are imported only when a segmentation runs (never at Slicer's start-up).
"""

import enum
import importlib
import logging
import os
import shutil
import sys
import tempfile
from typing import Annotated, Optional

import qt
import slicer
import vtk
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.parameterNodeWrapper import Choice, Decimals, SingleStep, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                          ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
from slicer.util import VTKObservationMixin

from MSDSegmentLib import background, dependencies, modelcard, mrml, terminology
from MSDSegmentLib.errors import Cancelled, MSDSegmentError

DATA_CREDITS = """
<p>Training data:</p>
<ul>
<li>Abdominal CT: BTCV, Multi-Atlas Labeling Beyond the Cranial Vault (Landman B, Xu Z, Iglesias JE, Styner M,
Langerak TR, Klein A. MICCAI 2015 Multi-Atlas Labeling Beyond the Cranial Vault - Workshop and Challenge).</li>
<li>Prostate MR: Medical Segmentation Decathlon Task05, Radboud University Nijmegen Medical Centre,
licence CC BY-SA 4.0 (Antonelli M et al., The Medical Segmentation Decathlon, Nature Communications 2022).</li>
</ul>
"""


def helpText(cards):
    """Module help with each model's figures, read from the model cards (not written here)."""
    models = "".join(
        f"<li><b>{card.title}</b>: {card.description}<br>{card.summary()}. {' '.join(n + '.' for n in card.notes())} "
        f"Trained on {card.training.get('data', 'see the model card')}. {card.licence}</li>"
        for card in cards.values()) or "<li>No model found in Resources/Models.</li>"
    return f"""
<p>Segments the liver, spleen and pancreas in contrast-enhanced abdominal CT and the prostate peripheral and
transition zones in T2-weighted + ADC MR with bundled U-Nets (MONAI DynUNet), one click, on the CPU or a GPU.
The result is a segmentation with SNOMED-CT coded segments, ready for the Segment Editor, Segment Statistics
or DICOM SEG export. Research use only: not for clinical decisions.</p>
<p>Models:</p><ul>{models}</ul>{DATA_CREDITS}
<p>See the <a href="https://github.com/msdsegment/SlicerMSDSegment">documentation</a>.</p>
"""


#
# MSDSegment
#


class MSDSegment(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "MSD Segment"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["MSDSegment contributors (https://github.com/msdsegment/SlicerMSDSegment)"]
        try:
            cards = modelcard.catalogue()
        except MSDSegmentError as error:  # a broken card must not stop Slicer from starting
            logging.error(str(error))
            cards = {}
        self.parent.helpText = helpText(cards)
        self.parent.acknowledgementText = """
Built on 3D Slicer, MONAI and PyTorch. The models were trained on BTCV (Landman et al., MICCAI 2015) and on the
Medical Segmentation Decathlon prostate data (Radboud University Nijmegen Medical Centre, CC BY-SA 4.0).
"""
        # The segments' codes must be known to the Terminologies module before any scene uses them.
        slicer.app.connect("startupCompleted()", loadTerminology)


def loadTerminology():
    """Load the extension's terminology context (every code of the model cards) into the Terminologies module.

    Called when Slicer has started and again by the logic (the module may be loaded after start-up); loading
    a context again replaces it."""
    try:
        terminologiesLogic = slicer.modules.terminologies.logic()
    except AttributeError:
        logging.warning("MSDSegment: the Terminologies module is not loaded; segments keep their codes but "
                        "Slicer cannot show them")
        return False
    if terminologiesLogic.LoadTerminologyFromFile(terminology.TERMINOLOGY_FILE) != terminology.CONTEXT_NAME:
        logging.error(f"MSDSegment: could not load the terminology {terminology.TERMINOLOGY_FILE}")
        return False
    return True


#
# MSDSegmentParameterNode
#


class Device(enum.Enum):
    AUTO = "auto"
    GPU = "cuda"
    CPU = "cpu"

    def label(self):  # the text the device picker shows
        return {"auto": "Auto (GPU if available)", "cuda": "GPU (CUDA)", "cpu": "CPU"}[self.value]


class Precision(enum.Enum):
    AUTO = "auto"
    FP32 = "fp32"
    BF16 = "bf16"
    FP16 = "fp16"

    def label(self):  # the text the precision picker shows
        return {"auto": "Auto (fastest that keeps the model's accuracy)", "fp32": "fp32 (full)",
                "bf16": "bf16 (CPUs with AMX or AVX-512 BF16)", "fp16": "fp16 (GPU)"}[self.value]


@parameterNodeWrapper
class MSDSegmentParameterNode:
    """The user's choices, saved with the scene."""

    inputVolume: vtkMRMLScalarVolumeNode
    adcVolume: vtkMRMLScalarVolumeNode
    task: Annotated[str, Choice(list(modelcard.TASKS))] = "liver"
    device: Device = Device.AUTO
    precision: Precision = Precision.AUTO
    testTimeMirroring: bool = False
    keepLargestComponent: bool = True
    outputSegmentation: vtkMRMLSegmentationNode
    show3D: bool = False
    allFrames: bool = False
    surfaceSmoothing: Annotated[float, WithinRange(0.0, 1.0), Decimals(2), SingleStep(0.1)] = 0.5


#
# MSDSegmentWidget
#


class MSDSegmentWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self.cards = {}
        self.run = None  # the BackgroundSegmentation in progress, if any

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/MSDSegment.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = MSDSegmentLogic()
        self.cards = self.logic.catalogue()
        self.ui.progressBar.hide()
        self.ui.volumesTable.horizontalHeader().setSectionResizeMode(0, qt.QHeaderView.Stretch)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.segmentButton.connect("clicked(bool)", self.onSegmentButton)
        self.ui.show3DCheckBox.connect("toggled(bool)", self.onShow3DToggled)
        self.initializeParameterNode()

    def onReload(self) -> None:
        """Reload MSDSegmentLib too (Slicer's reload re-executes only this file)."""
        for name in sorted(name for name in sys.modules if name.startswith("MSDSegmentLib.")):
            importlib.reload(sys.modules[name])
        ScriptedLoadableModuleWidget.onReload(self)

    def cleanup(self) -> None:
        if self.run is not None:
            self.run.cancel()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)

    def onSceneStartClose(self, caller, event) -> None:
        if self.run is not None:
            self.run.cancel()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            self._parameterNode.inputVolume = mrml.default_input_volume(slicer.mrmlScene)

    def setParameterNode(self, inputParameterNode: Optional[MSDSegmentParameterNode]) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            # The .ui file names each bound widget's parameter in its SlicerParameterName property.
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.describePickerItems()
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)
            self.updateGUIFromParameterNode()

    def describePickerItems(self) -> None:
        """Task items show the card's one-line summary; unavailable choices are disabled with the reason.

        connectGui fills the pickers with the raw choices (task ids), so this runs after each connectGui.
        """
        for index, task in enumerate(modelcard.TASKS):
            card = self.cards.get(task)
            self.ui.taskComboBox.setItemText(index, card.summary() if card else f"{task} (model not installed)")
            self.setItemEnabled(self.ui.taskComboBox, index, card is not None and not modelcard.missing_weights(card))
        gpuAvailable, reason = dependencies.gpu_status()
        gpuIndex = list(Device).index(Device.GPU)
        self.setItemEnabled(self.ui.deviceComboBox, gpuIndex, gpuAvailable)
        self.ui.deviceComboBox.setItemData(gpuIndex, reason, qt.Qt.ToolTipRole)

    @staticmethod
    def setItemEnabled(comboBox, index, enabled) -> None:
        item = comboBox.model().item(index)
        if item is not None:
            item.setEnabled(enabled)

    def updateGUIFromParameterNode(self, caller=None, event=None) -> None:
        """Show what the chosen task needs, fill in the ADC, and say whether Segment can run."""
        node = self._parameterNode
        card = self.cards.get(node.task) if node else None
        needsAdc = card is not None and len(card.channels) > 1
        self.ui.adcVolumeLabel.visible = needsAdc
        self.ui.adcVolumeSelector.visible = needsAdc
        self.ui.taskDescriptionLabel.text = card.description if card else ""
        mirrorAxes = bool(card and any(stage.mirror_axes for stage in card.stages))
        self.ui.testTimeMirroringCheckBox.enabled = mirrorAxes
        self.ui.smoothingSliderWidget.enabled = bool(node and node.show3D)
        inSequence = bool(node and node.inputVolume and self.logic.sequenceOf(node.inputVolume)[1] is not None)
        self.ui.allFramesCheckBox.visible = inSequence and not needsAdc
        if node and needsAdc and node.inputVolume and not node.adcVolume:
            guess = self.logic.guessAdcVolume(node.inputVolume)
            if guess:
                node.adcVolume = guess  # triggers this update again, with the ADC set
                return
        if self.run is not None:
            return
        missing = self.missingInput(node, card, needsAdc)
        self.ui.segmentButton.enabled = not missing
        self.ui.segmentButton.toolTip = missing or "Run the model on the input volume"

    @staticmethod
    def missingInput(node, card, needsAdc) -> str:
        if node is None:
            return "No parameter node"
        if card is None or modelcard.missing_weights(card):
            return f"The model for '{node.task}' is not installed"
        if not node.inputVolume:
            return "Select an input volume"
        if needsAdc and not node.adcVolume:
            return "Select the ADC volume"
        return ""

    def onSegmentButton(self) -> None:
        if self.run is not None:
            self.ui.statusLabel.text = "Cancelling..."
            self.run.cancel()
            return
        node = self._parameterNode
        card = self.cards[node.task]
        adc = node.adcVolume if len(card.channels) > 1 else None
        self.showVolumes(None)
        batch = [volume for volume in self.ui.batchVolumesComboBox.checkedNodes() if volume is not node.inputVolume]
        allFrames = node.allFrames and self.ui.allFramesCheckBox.visible
        if adc is None and (allFrames or batch):  # the sequence's frames, else the input and the volumes checked
            self.segmentInThisProcess([node.inputVolume] + ([] if allFrames else batch), allFrames)
            return
        with slicer.util.tryWithErrorDisplay("Cannot start the segmentation.", waitCursor=True):
            self.logic.installDependencies(report=self.showInstalling)
            self.ui.statusLabel.text = ""
            self.run = self.logic.segment(node.inputVolume, node.task, adc, node.outputSegmentation,
                                          device=node.device.value, precision=node.precision.value,
                                          tta=node.testTimeMirroring,
                                          keepLargest=node.keepLargestComponent, waitForCompletion=False,
                                          progress=self.onProgress, finished=self.onFinished)
            self.setRunning(True)

    def segmentInThisProcess(self, volumes, allFrames) -> None:
        """Several volumes, or every frame of the input's sequence, in Slicer's process: the progress bar shows
        the whole batch and the status line the volume and its stage; Cancel stops the batch between network
        windows (what finished stays, the unfinished one leaves nothing)."""
        node = self._parameterNode
        self.cancelRequested = False
        self.run = self  # the Segment button now cancels (see cancel())
        self.setRunning(True)
        options = dict(device=node.device.value, precision=node.precision.value, tta=node.testTimeMirroring,
                       keepLargest=node.keepLargestComponent, progress=self.onBatchProgress,
                       cancel=lambda: self.cancelRequested)
        failures, results = [], []
        try:
            self.logic.installDependencies(report=self.showInstalling)
            if allFrames:
                results = [self.logic.segmentSequence(volumes[0], node.task, **options)]
            else:
                results = self.logic.segmentMany(volumes, node.task, **options,
                                                 onError=lambda index, error: failures.append(
                                                     f"{volumes[index].GetName()}: {mrml.describe_error(error)}"))
        except Exception as error:
            failures.append(mrml.describe_error(error))
        finally:
            self.run = None
            self.setRunning(False)
        done = [result for result in results if result is not None]
        for result in done:
            self.logic.showSurfaces(result, node.show3D, node.surfaceSmoothing)
        if done:
            self.showVolumes(done[-1])
        stopped = " Cancelled: the rest was not segmented." if self.cancelRequested else ""
        self.ui.statusLabel.text = f"Done: {len(done)} of {len(results) or len(volumes)} segmented.{stopped}" + \
            "".join(f"\nFailed: {failure}" for failure in failures)
        if failures and not self.cancelRequested:
            slicer.util.errorDisplay("Some volumes could not be segmented.", detailedText="\n".join(failures))

    def cancel(self) -> None:
        self.cancelRequested = True

    def onBatchProgress(self, fraction, text) -> None:
        self.onProgress(fraction, text)
        slicer.app.processEvents()  # keeps the Cancel button alive between network windows

    def showInstalling(self, text) -> None:
        """Say what is being installed: pip blocks the GUI for minutes on the first run."""
        self.ui.statusLabel.text = text
        slicer.app.processEvents()

    def setRunning(self, running) -> None:
        self.ui.segmentButton.text = "Cancel" if running else "Segment"
        self.ui.segmentButton.enabled = True
        for widget in (self.ui.inputsCollapsibleButton, self.ui.optionsCollapsibleButton,
                       self.ui.outputsCollapsibleButton):
            widget.enabled = not running
        self.ui.progressBar.visible = running
        if running:
            self.ui.progressBar.value = 0
            self.ui.statusLabel.text = "Starting..."
        else:
            self.updateGUIFromParameterNode()

    def onProgress(self, fraction, stage) -> None:
        self.ui.progressBar.value = int(round(100 * fraction))
        self.ui.statusLabel.text = stage

    def onFinished(self, segmentationNode, error, warnings) -> None:
        self.run = None
        self.setRunning(False)
        node = self._parameterNode
        if segmentationNode is not None:
            node.outputSegmentation = segmentationNode  # the next run replaces it
            self.logic.showSurfaces(segmentationNode, node.show3D, node.surfaceSmoothing)
            self.showVolumes(segmentationNode)
            self.ui.statusLabel.text = "Done." + "".join(f"\nWarning: {w}" for w in warnings)
        elif isinstance(error, Cancelled):
            self.ui.statusLabel.text = "Cancelled: nothing was changed."
        else:
            message = mrml.describe_error(error)
            self.ui.statusLabel.text = f"Failed: {message}"
            slicer.util.errorDisplay(f"Segmentation failed: {message}", detailedText=getattr(error, "details", ""))

    def onShow3DToggled(self, show) -> None:
        """Show or hide the surfaces of the current result (built with the smoothing chosen)."""
        node = self._parameterNode
        if node and node.outputSegmentation and self.run is None:
            with slicer.util.tryWithErrorDisplay("Cannot build the 3-D surfaces.", waitCursor=True):
                self.logic.showSurfaces(node.outputSegmentation, show, node.surfaceSmoothing)

    def showVolumes(self, segmentationNode) -> None:
        """Fill the volumes table from a result; None empties it (a run started or failed)."""
        rows = self.logic.segmentVolumes(segmentationNode) if segmentationNode is not None else []
        quality = mrml.quality_from_tags(segmentationNode) if segmentationNode is not None else {}
        table = self.ui.volumesTable
        table.setRowCount(len(rows))
        for row, (name, color, volumeMl) in enumerate(rows):
            nameItem = qt.QTableWidgetItem(name)
            nameItem.setData(qt.Qt.DecorationRole, qt.QColor.fromRgbF(*color))
            volumeItem = qt.QTableWidgetItem(f"{volumeMl:.1f}")
            volumeItem.setTextAlignment(qt.Qt.AlignRight | qt.Qt.AlignVCenter)
            entry = quality.get(name, {})
            qualityItem = qt.QTableWidgetItem(mrml.quality_text(entry))
            qualityItem.setToolTip("How far to trust this segment, from the network's confidence and where the "
                                   "organ lies (calibrated on cases the model did not train on)")
            if entry.get("check"):
                qualityItem.setForeground(qt.QBrush(qt.QColor("darkorange")))
            table.setItem(row, 0, nameItem)
            table.setItem(row, 1, volumeItem)
            table.setItem(row, 2, qualityItem)


class BackgroundSegmentation:
    """One run of the engine's command line in a separate process, the GUI staying responsive.

    Why a process and not a worker thread: the engine is Python (resampling, post-processing) that
    would hold the GIL for seconds at a time and freeze the GUI; a process can be stopped at once
    (a thread only between sliding windows); an out-of-memory or a crash in PyTorch cannot take Slicer
    down; and torch is never loaded into Slicer's process. The cost is writing the input to a
    temporary file and loading the model in each run (about a second each). MRML nodes are only
    touched here, in the main thread, when the process has finished.

    progress(fraction, stage text) is called as the engine reports; finished(segmentation node or None,
    error or None, warnings) once, at the end (errors.Cancelled after cancel()).
    """

    def __init__(self, logic, inputNodes, task, outputNode, device, precision, tta, keepLargest, progress, finished):
        self.logic = logic
        self.inputNodes = inputNodes
        self.task = task
        self.outputNode = outputNode
        self.arguments = dict(device=device, precision=precision, tta=tta, keep_largest=keepLargest)
        self.progress = progress
        self.onFinished = finished
        self.workspace = None
        self.process = None
        self.cancelled = False
        self.pendingOutput = ""
        self.errorOutput = ""

    def start(self) -> None:
        self.workspace = background.Workspace()
        try:
            inputs = mrml.write_inputs(self.inputNodes, self.workspace.folder)
            arguments = background.segment_arguments(self.task, inputs, self.workspace.output, **self.arguments)
            self.process = qt.QProcess()
            environment = qt.QProcessEnvironment.systemEnvironment()
            environment.insert("PYTHONPATH", background.python_path(environment.value("PYTHONPATH")))
            self.process.setProcessEnvironment(environment)
            self.process.setWorkingDirectory(background.MODULE_FOLDER)
            self.process.connect("readyReadStandardOutput()", self.readOutput)
            self.process.connect("readyReadStandardError()", self.readErrors)
            self.process.connect("finished(int,QProcess::ExitStatus)", self.finished)
            executable = pythonExecutable()
            self.process.start(executable, arguments)
            if not self.process.waitForStarted(10000):
                raise MSDSegmentError(f"Cannot start {executable}: {self.process.errorString()}")
        except Exception:
            self.release()
            self.workspace.remove()
            raise

    def isRunning(self) -> bool:
        return self.process is not None and self.process.state() != qt.QProcess.NotRunning

    def cancel(self) -> None:
        """Stop the engine at once. PythonSlicer is a launcher whose child, python-real, runs the engine:
        killing the launcher would leave the child running, but the child shares its standard input and
        exits when that closes (--exit-when-stdin-closes)."""
        self.cancelled = True
        if self.isRunning():
            self.process.closeWriteChannel()
            self.process.kill()  # finished() follows, which cleans up

    def readOutput(self) -> None:
        self.pendingOutput += self.process.readAllStandardOutput().data().decode("utf-8", "replace")
        *lines, self.pendingOutput = self.pendingOutput.split("\n")
        for line in lines:
            progress = background.parse_progress(line)
            if progress is not None and self.progress is not None:
                self.progress(*progress)

    def readErrors(self) -> None:
        self.errorOutput += self.process.readAllStandardError().data().decode("utf-8", "replace")

    def finished(self, exitCode, exitStatus) -> None:
        self.readOutput()
        self.readErrors()
        node, error = None, None
        try:
            if self.cancelled:
                error = Cancelled()
            elif exitStatus != qt.QProcess.NormalExit or exitCode != 0:
                error = MSDSegmentError(background.error_message(self.errorOutput, exitCode))
                error.details = self.errorOutput  # the whole output, for the error dialog's details
                logging.error(f"MSDSegment: the segmentation process failed (exit code {exitCode}):\n"
                              f"{self.errorOutput}")
            else:
                node = self.logic.importResult(self.workspace.output, self.inputNodes[0], self.task, self.outputNode)
        except Exception as exception:
            logging.exception("Importing the segmentation failed")
            error = exception
        finally:
            self.workspace.remove()
            self.release()
        if self.onFinished is not None:
            self.onFinished(node, error, background.warnings_in(self.errorOutput))

    def release(self) -> None:
        """Disconnect the process and let Qt delete it: PythonQt's connections would otherwise keep this run,
        its process and its input nodes alive after every run."""
        if self.process is None:
            return
        self.process.disconnect("readyReadStandardOutput()", self.readOutput)
        self.process.disconnect("readyReadStandardError()", self.readErrors)
        self.process.disconnect("finished(int,QProcess::ExitStatus)", self.finished)
        self.process.deleteLater()
        self.process = None


def pythonExecutable():
    """Slicer's own Python interpreter (PythonSlicer), which sees the packages installed in Slicer."""
    executable = shutil.which("PythonSlicer")
    if not executable:
        raise MSDSegmentError("Slicer's Python interpreter (PythonSlicer) was not found on the PATH")
    return executable


#
# MSDSegmentLogic
#


class MSDSegmentLogic(ScriptedLoadableModuleLogic):
    """Everything the module does without its GUI; the MRML work itself is in MSDSegmentLib.mrml.

    From the Python console: `MSDSegmentLogic().segment(volumeNode, task="spleen")`, or without blocking:
    `run = MSDSegmentLogic().segment(volumeNode, "spleen", waitForCompletion=False, finished=callback)`.
    """

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)
        loadTerminology()  # in case the module was loaded after Slicer's start-up

    def getParameterNode(self):
        return MSDSegmentParameterNode(super().getParameterNode())

    @staticmethod
    def catalogue(modelsDir=None):
        return modelcard.catalogue(modelsDir or modelcard.MODELS_DIR)

    def segment(self, inputVolumeNode, task="liver", adcVolumeNode=None, outputSegmentationNode=None,
                device="auto", tta=False, keepLargest=True, progress=None, cancel=None, modelsDir=None,
                waitForCompletion=True, finished=None, precision="auto"):
        """Segment a volume (and, for the prostate, its ADC) with a task's model.

        waitForCompletion=True (default): run in this process, blocking, and return the segmentation node.
        progress(fraction, stage) and cancel() -> bool are optional callbacks. Raises an MSDSegmentError with a
        one-line message for bad inputs (the scene is then unchanged), errors.Cancelled if cancelled.
        precision: auto, fp32, bf16 or fp16 for the network (auto: the fastest the model card shows to keep
        the task's validation Dice on this hardware).

        waitForCompletion=False: run the engine in a background process (as the panel does) and return the
        BackgroundSegmentation at once; its cancel() stops it. progress(fraction, stage) reports, and
        finished(segmentation node or None, error or None, warnings) is called when it ends. Needs Slicer's
        event loop (the GUI, or slicer.app.processEvents() in a script).
        """
        self.installDependencies()
        inputs = [inputVolumeNode] + ([adcVolumeNode] if adcVolumeNode is not None else [])
        if not waitForCompletion:
            if modelsDir is not None or cancel is not None:
                raise MSDSegmentError("A background run uses the bundled models and is stopped by its cancel()")
            run = BackgroundSegmentation(self, inputs, task, outputSegmentationNode, device, precision, tta,
                                         keepLargest, progress, finished)
            run.start()
            return run
        return mrml.segment(inputs, task, outputSegmentationNode, device=device, tta=tta, keep_largest=keepLargest,
                            progress=progress, cancel=cancel, models_dir=modelsDir, precision=precision)

    @staticmethod
    def importResult(labelPath, inputVolumeNode, task, outputSegmentationNode=None, modelsDir=None):
        """Import a label map written by the command line for this input (the GUI's background path)."""
        if outputSegmentationNode is not None and outputSegmentationNode.GetScene() is None:
            outputSegmentationNode = None  # deleted while the model ran: make a new one
        if inputVolumeNode.GetScene() is None:
            raise MSDSegmentError("The input volume was removed from the scene while the model ran")
        return mrml.import_label_file(labelPath, inputVolumeNode, task, outputSegmentationNode, modelsDir)

    @staticmethod
    def segmentVolumes(segmentationNode):
        """[(segment name, colour, volume in mL)]."""
        return mrml.segment_volumes_ml(segmentationNode)

    @staticmethod
    def showSurfaces(segmentationNode, show=True, smoothing=0.5):
        """Build (with this smoothing factor, 0-1) or remove the segments' 3-D surfaces."""
        mrml.show_surfaces(segmentationNode, show, smoothing)

    def segmentMany(self, volumeNodes, task="liver", device="auto", tta=False, keepLargest=True, progress=None,
                    cancel=None, onError=None, modelsDir=None, precision="auto"):
        """Segment each volume on its own (for the prostate each item is [T2, ADC]); returns the segmentation
        nodes in input order, None where a volume failed or was not reached.

        A bad volume fails alone: onError(index, error) gets its one-line reason (default: a logged warning),
        and the others complete. cancel() -> bool stops the batch: finished results stay, the unfinished one
        leaves nothing. progress(fraction of the batch, text naming the volume and its stage)."""
        self.installDependencies()
        return mrml.segment_many(volumeNodes, task, device=device, tta=tta, keep_largest=keepLargest,
                                 progress=progress, cancel=cancel, on_error=onError, models_dir=modelsDir,
                                 precision=precision)

    def segmentSequence(self, volumeNode, task="liver", device="auto", tta=False, keepLargest=True,
                        progress=None, cancel=None, modelsDir=None, precision="auto"):
        """Segment every frame of the sequence that volumeNode shows into a segmentation sequence played by the
        same sequence browser; returns the segmentation node that shows the current frame. A bad frame or a
        cancel leaves the scene as it was."""
        self.installDependencies()
        return mrml.segment_sequence(volumeNode, task, device=device, tta=tta, keep_largest=keepLargest,
                                     progress=progress, cancel=cancel, models_dir=modelsDir, precision=precision)

    @staticmethod
    def sequenceOf(volumeNode):
        """(sequence browser, sequence) that play volumeNode, or (None, None)."""
        return mrml.sequence_of(volumeNode)

    @staticmethod
    def guessAdcVolume(t2VolumeNode):
        return mrml.guess_adc_volume(slicer.mrmlScene, t2VolumeNode)

    @staticmethod
    def installDependencies(askConfirmation=True, report=None):
        """Install PyTorch (through the PyTorch extension) and Resources/requirements.txt on first use.

        report(text), if given, is told what is being installed (each step blocks for a while). The packages
        that Slicer and the PyTorch extension installed (torch, numpy, scipy, SimpleITK) are pinned, so pip
        picks versions that fit them instead of replacing them."""
        problem = dependencies.installation_problem()
        if problem:  # said before anything is downloaded
            raise MSDSegmentError(problem)
        if dependencies.torch_needed():
            if report:
                report("Installing PyTorch (through the PyTorch extension)...")
            installTorch(askConfirmation)
        unmet = dependencies.unmet_requirements()
        if not unmet:
            return
        if askConfirmation and not slicer.util.confirmOkCancelDisplay(
                "MSDSegment needs these Python packages: " + ", ".join(unmet) + ". Install them now?",
                "MSDSegment: install packages"):
            raise MSDSegmentError("The packages MSDSegment needs are not installed: " + ", ".join(unmet))
        if report:
            report("Installing Python packages: " + ", ".join(unmet) + "...")
        with tempfile.TemporaryDirectory(prefix="MSDSegment-pip-") as folder:
            constraints = os.path.join(folder, "constraints.txt")
            with open(constraints, "w", encoding="utf-8") as stream:
                stream.write(dependencies.constraints_text(dependencies.installed_versions()))
            slicer.util.pip_install(dependencies.pip_arguments(constraints))
        still = dependencies.unmet_requirements()
        if still:
            raise MSDSegmentError("These packages could not be installed: " + ", ".join(still) + " (see the log)")


def installTorch(askConfirmation=True):
    """PyTorch from the PyTorch extension (it picks the CUDA or CPU build), else plain pip after asking."""
    try:
        import PyTorchUtils
    except ImportError:
        PyTorchUtils = None
    requirement = dependencies.torch_requirement()
    if PyTorchUtils is not None:
        torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=askConfirmation,
                                                              torchVersionRequirement=requirement)
        if torch is None:
            raise MSDSegmentError("PyTorch is needed to run the models and was not installed")
        return
    if askConfirmation and not slicer.util.confirmOkCancelDisplay(
            "MSDSegment needs PyTorch, and the PyTorch extension (which picks the right GPU build) is not "
            "installed. Install the default PyTorch build with pip now (about 1 GB or more)?",
            "MSDSegment: install PyTorch"):
        raise MSDSegmentError("PyTorch is needed to run the models and was not installed")
    slicer.util.pip_install("torch" + requirement)


#
# MSDSegmentTest
#


class MSDSegmentTest(ScriptedLoadableModuleTest):
    """Runs, inside Slicer, the same logic tests as pytest (MSDSegmentLib/selftests.py) on the real
    application scene with the bundled models. Real data is taken from MSDSEGMENT_DATA (or the
    repository's ../shared/data); without it the CT tests use a synthetic phantom."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        import unittest

        from MSDSegmentLib import selftests

        missing = (["PyTorch" + dependencies.torch_requirement()] if dependencies.torch_needed() else []) \
            + dependencies.unmet_requirements()
        if missing:  # reported as a skip with a warning, never as a pass
            message = ("MSDSegment self-test NOT RUN: install " + ", ".join(missing)
                       + " first (click Segment once, or MSDSegmentLogic().installDependencies()).")
            logging.warning(message)
            self.delayDisplay(message, 3000)
            raise unittest.SkipTest(message)
        root = tempfile.mkdtemp(prefix="MSDSegmentTest-")
        try:
            for index, name in enumerate(selftests.TESTS + selftests.TRAINED_MODEL_TESTS):
                self.setUp()
                self.delayDisplay(name, 100)
                folder = os.path.join(root, str(index))
                os.makedirs(folder)
                try:
                    getattr(selftests, name)(self.context(folder))
                except unittest.SkipTest as reason:
                    logging.info(f"{name} skipped: {reason}")
        finally:
            shutil.rmtree(root, ignore_errors=True)
        self.delayDisplay("Test passed")

    def context(self, folder):
        from MSDSegmentLib import selftests

        data = os.environ.get("MSDSEGMENT_DATA", os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data"))
        btcv = firstCase(os.path.join(data, "BTCV-Abdomen"))
        ctPath = btcv.get("image") or selftests.write_phantom_ct(os.path.join(folder, "phantom_ct.nrrd"))
        return selftests.Context(
            scene=slicer.mrmlScene,
            load_volume=lambda path, name: slicer.util.loadVolume(path, {"name": name, "show": False}),
            new_scene=newScene, models_dir=modelcard.MODELS_DIR, folder=folder, ct_path=ctPath,
            ct_labels_path=btcv.get("label", ""),
            prostate_path=firstCase(os.path.join(data, "Task05_Prostate")).get("image", ""),
            python=pythonExecutable())


def firstCase(folder):
    """{'image': path, 'label': path} of an MSD-layout data set's first training case, {} if absent."""
    import json

    try:
        with open(os.path.join(folder, "dataset.json"), encoding="utf-8") as stream:
            case = json.load(stream)["training"][0]
    except (OSError, ValueError, KeyError, IndexError):
        return {}
    return {key: os.path.normpath(os.path.join(folder, value)) for key, value in case.items()}


def newScene():
    """An empty scene that can hold segmentations (for reloading a saved file away from the main scene)."""
    scene = slicer.vtkMRMLScene()
    for nodeClass in (slicer.vtkMRMLSegmentationNode, slicer.vtkMRMLSegmentationDisplayNode,
                      slicer.vtkMRMLSegmentationStorageNode):
        scene.RegisterNodeClass(nodeClass())
    return scene
