"""MSDSegment: segment the liver, spleen and pancreas in CT and the prostate zones in MR with bundled U-Nets.

The classes here are thin: the engine (MSDSegmentLib) does the segmentation without Qt or Slicer,
MSDSegmentLib.mrml turns volume nodes into segmentation nodes, and MSDSegmentLib.background runs the engine
in one background process per batch, which is how every panel run goes (MSDSegmentLib.application holds the
QProcess glue). Importing this file must stay cheap: torch and MONAI are never imported into Slicer's process
by the panel, and by a script only when it segments in this process (waitForCompletion=True).
"""

import enum
import logging
import os
import sys
from typing import Annotated, Optional

import qt
import slicer
import vtk
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.parameterNodeWrapper import Choice, Decimals, SingleStep, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                          ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
from slicer.util import VTKObservationMixin

import MSDSegmentLib
from MSDSegmentLib import application, background, dependencies, modelcard, mrml
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
        slicer.app.connect("startupCompleted()", application.load_terminology)


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
    batchVolumes: list[vtkMRMLScalarVolumeNode]  # "Also segment": further volumes, each segmented alone
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
        self.engineChoices = None  # the panel's choices the engine process was last prepared for

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
        self.ui.smoothingSliderWidget.tracking = False  # rebuild the surfaces once, when the slider is let go

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.segmentButton.connect("clicked(bool)", self.onSegmentButton)
        # clicked, not toggled: restoring a scene sets the box without building surfaces nobody asked for.
        self.ui.show3DCheckBox.connect("clicked(bool)", self.onShow3DClicked)
        self.ui.smoothingSliderWidget.connect("valueChanged(double)", self.onSmoothingChanged)
        # No parameter node connector exists for a checkable node combo box: this one is kept in step by hand.
        self.ui.batchVolumesComboBox.connect("checkedNodesChanged()", self.onBatchVolumesChecked)
        self.initializeParameterNode()

    def onReload(self) -> None:
        """Reload MSDSegmentLib too (Slicer's reload re-executes only this file), each module after those it
        imports, so that they share one copy of each class (an engine error is still an MSDSegmentError)."""
        MSDSegmentLib.reload_modules()
        ScriptedLoadableModuleWidget.onReload(self)

    def cleanup(self) -> None:
        if self.run is not None:
            self.run.cancel()
        self.logic.releaseEngine()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()
        self.prepareEngine()

    def exit(self) -> None:
        self.logic.releaseEngine()  # an idle engine holds PyTorch and the networks in memory
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
        """Show what the chosen task and input allow, fill in the ADC, and say whether Segment can run."""
        node = self._parameterNode
        card = self.cards.get(node.task) if node else None
        choice = self.panelChoice()
        self.ui.adcVolumeLabel.visible = self.ui.adcVolumeSelector.visible = choice.needs_adc
        self.ui.taskDescriptionLabel.text = card.description if card else ""
        self.ui.testTimeMirroringCheckBox.enabled = bool(card and any(stage.mirror_axes for stage in card.stages))
        self.ui.allFramesCheckBox.visible = choice.in_sequence and not choice.needs_adc
        self.showBatchVolumes(node.batchVolumes if node else [])
        for widget in (self.ui.batchVolumesLabel, self.ui.batchVolumesComboBox):
            widget.enabled = not choice.batch_unavailable
            widget.toolTip = choice.batch_unavailable or "Further volumes to segment with the same task, each alone"
        self.ui.show3DCheckBox.enabled = not choice.surfaces_unavailable
        self.ui.show3DCheckBox.toolTip = choice.surfaces_unavailable or "Build the segments' 3-D surfaces"
        self.ui.smoothingSliderWidget.enabled = bool(node and node.show3D) and not choice.surfaces_unavailable
        if node and choice.needs_adc and node.inputVolume and not node.adcVolume:
            guess = self.logic.guessAdcVolume(node.inputVolume)
            if guess:
                node.adcVolume = guess  # triggers this update again, with the ADC set
                return
        if self.run is not None:
            return
        self.prepareEngine(again=False)
        self.ui.segmentButton.enabled = not choice.missing
        self.ui.segmentButton.toolTip = choice.missing or "Run the model on the input volume"

    def panelChoice(self):
        """What Segment would run, from the parameter node only (never from what the widgets show)."""
        node = self._parameterNode
        if node is None:
            choice = mrml.PanelChoice("", None)
            choice.missing = "No parameter node"
            return choice
        return mrml.PanelChoice(node.task, self.cards.get(node.task), node.inputVolume, node.adcVolume,
                                node.allFrames, node.outputSegmentation)

    def onSegmentButton(self) -> None:
        if self.run is not None:
            self.ui.statusLabel.text = "Cancelling..."
            self.run.cancel()
            return
        node = self._parameterNode
        choice = self.panelChoice()
        self.showVolumes(None)
        batch = [] if choice.batch_unavailable else [volume for volume in node.batchVolumes if volume is not None]
        options = dict(device=node.device.value, precision=node.precision.value, tta=node.testTimeMirroring,
                       keepLargest=node.keepLargestComponent, waitForCompletion=False, progress=self.onProgress,
                       finished=self.onFinished)
        with slicer.util.tryWithErrorDisplay("Cannot start the segmentation.", waitCursor=True):
            self.logic.installDependencies(report=self.showInstalling)
            self.ui.statusLabel.text = ""
            if choice.all_frames:
                self.run = self.logic.segmentSequence(node.inputVolume, node.task, **options)
            else:  # the input (with its ADC for the prostate) into the output chosen, then each volume checked
                first = [node.inputVolume, node.adcVolume] if choice.needs_adc else node.inputVolume
                others = [volume for volume in batch if volume is not node.inputVolume]
                self.run = self.logic.segmentMany([first] + others, node.task,
                                                  outputNodes=[node.outputSegmentation], **options)
            self.setRunning(True)

    def onBatchVolumesChecked(self) -> None:
        if self._parameterNode:
            self._parameterNode.batchVolumes = list(self.ui.batchVolumesComboBox.checkedNodes())

    def showBatchVolumes(self, volumes) -> None:
        """Check the volumes the parameter node lists, and only those (without writing them back)."""
        comboBox = self.ui.batchVolumesComboBox
        wanted = {volume.GetID() for volume in volumes if volume is not None}
        wasBlocked = comboBox.blockSignals(True)
        try:
            for volume in list(comboBox.checkedNodes()) + list(comboBox.uncheckedNodes()):
                comboBox.setCheckState(volume, qt.Qt.Checked if volume.GetID() in wanted else qt.Qt.Unchecked)
        finally:
            comboBox.blockSignals(wasBlocked)

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

    def onProgress(self, fraction, text) -> None:
        """The bar shows the whole batch; the line names the volume, how far it is and its stage."""
        self.ui.progressBar.value = int(round(100 * fraction))
        self.ui.statusLabel.text = text

    def prepareEngine(self, again=True) -> None:
        """Have an engine process load the chosen task's networks before Segment is clicked (best effort: a run
        without one starts its own). again=False: only if the choices changed since the last call."""
        node = self._parameterNode
        if node is None or self.run is not None or node.task not in self.cards or not self.parent.isEntered:
            return
        choices = (node.task, node.device.value, node.precision.value, node.testTimeMirroring,
                   node.keepLargestComponent)
        if not again and choices == self.engineChoices:
            return
        self.engineChoices = choices
        try:
            self.logic.prepareEngine(*choices)
        except Exception as error:
            logging.warning(f"MSDSegment: the engine process could not be started ahead of the run: {error}")

    def onFinished(self, outcome) -> None:
        self.run = None
        self.setRunning(False)
        node = self._parameterNode
        done = outcome.done
        if done and not mrml.is_sequence_output(outcome.output):
            if outcome.results[0] is not None:
                node.outputSegmentation = outcome.results[0]  # the next run of this input replaces it
            with slicer.util.tryWithErrorDisplay("Cannot build the 3-D surfaces.", waitCursor=True):
                for segmentation in done:
                    self.logic.showSurfaces(segmentation, node.show3D, node.surfaceSmoothing)
        self.showVolumes(outcome.output)
        self.ui.statusLabel.text = outcome.report()
        self.prepareEngine()  # for the next run, once the surfaces are built
        for index, error in sorted(outcome.errors.items()):  # the whole output, for whoever reports a bug
            logging.error(f"MSDSegment: {outcome.names[index]}: {error}\n{getattr(error, 'details', '')}")
        if outcome.errors and not outcome.cancelled:
            slicer.util.errorDisplay(outcome.report(),
                                     detailedText="\n\n".join(getattr(error, "details", "")
                                                              for error in outcome.errors.values()))

    def onShow3DClicked(self, show) -> None:
        """Show or hide the surfaces of the current result (built with the smoothing chosen)."""
        node = self._parameterNode
        if node and node.outputSegmentation and self.run is None:
            with slicer.util.tryWithErrorDisplay("Cannot build the 3-D surfaces.", waitCursor=True):
                self.logic.showSurfaces(node.outputSegmentation, show, node.surfaceSmoothing)

    def onSmoothingChanged(self, smoothing) -> None:
        """Rebuild surfaces already shown with the new smoothing (none are built if there were none)."""
        node = self._parameterNode
        if node and node.outputSegmentation and self.run is None:
            with slicer.util.tryWithErrorDisplay("Cannot build the 3-D surfaces.", waitCursor=True):
                self.logic.updateSurfaceSmoothing(node.outputSegmentation, smoothing)

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


#
# MSDSegmentLogic
#


class MSDSegmentLogic(ScriptedLoadableModuleLogic):
    """Everything the module does without its GUI; the MRML work is in MSDSegmentLib.mrml and the background runner
    in MSDSegmentLib.background.

    From the Python console: `MSDSegmentLogic().segment(volumeNode, task="spleen")` runs in this process and
    returns the segmentation. With waitForCompletion=False, segment, segmentMany and segmentSequence run the
    engine in one background process, as the panel does, and return the run at once: run.cancel() stops it,
    run.wait() blocks until it ends (pumping Slicer's events) and returns its Outcome.
    """

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)
        application.load_terminology()  # in case the module was loaded after Slicer's start-up
        self.standby = None  # the engine process started ahead of the next background run (prepareEngine)

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

        waitForCompletion=False: run in a background process (see the class) and return the run;
        finished(segmentation node or None, error or None, warnings) is called when it ends.
        """
        inputs = [inputVolumeNode] + ([adcVolumeNode] if adcVolumeNode is not None else [])
        if not waitForCompletion:
            def reportOne(outcome):
                error = outcome.errors.get(0) or (Cancelled() if outcome.cancelled else None)
                if finished is not None:
                    finished(outcome.results[0], None if outcome.results[0] is not None else error, outcome.warnings)

            return self.segmentMany([inputs], task, device, tta, keepLargest, progress, cancel, modelsDir=modelsDir,
                                    precision=precision, outputNodes=[outputSegmentationNode],
                                    waitForCompletion=False, finished=reportOne)
        self.installDependencies()
        return mrml.segment(inputs, task, outputSegmentationNode, device=device, tta=tta, keep_largest=keepLargest,
                            progress=progress, cancel=cancel, models_dir=modelsDir, precision=precision)

    def segmentMany(self, volumeNodes, task="liver", device="auto", tta=False, keepLargest=True, progress=None,
                    cancel=None, onError=None, modelsDir=None, precision="auto", outputNodes=None,
                    waitForCompletion=True, finished=None):
        """Segment each volume on its own (for the prostate each item is [T2, ADC]); a volume that fails, whatever
        the error, fails alone and the others complete.

        waitForCompletion=True: in this process; returns the segmentation nodes in input order, None where a
        volume failed or was not reached; onError(index, error) gets each failure (default: a logged warning);
        cancel() -> bool stops the batch, the results finished stay. progress(fraction of the batch, text).
        waitForCompletion=False: one background process serves the batch; returns the run, and
        finished(Outcome) is called at the end (Outcome.results, .errors by index, .report()).
        outputNodes: the segmentation node to refill for each volume (None: a new one)."""
        if not waitForCompletion:
            if cancel is not None or onError is not None:
                raise MSDSegmentError("A background run is stopped by its cancel() and reports in finished()")
            batch = mrml.VolumeBatch(volumeNodes, task, outputNodes, modelsDir)
            return self.startInBackground(batch, task, device, precision, tta, keepLargest, modelsDir, progress,
                                          finished)
        self.installDependencies()
        return mrml.segment_many(volumeNodes, task, device=device, tta=tta, keep_largest=keepLargest,
                                 progress=progress, cancel=cancel, on_error=onError, models_dir=modelsDir,
                                 precision=precision)

    def segmentSequence(self, volumeNode, task="liver", device="auto", tta=False, keepLargest=True,
                        progress=None, cancel=None, modelsDir=None, precision="auto", waitForCompletion=True,
                        finished=None):
        """Segment every frame of the sequence that volumeNode shows into a segmentation sequence played by the
        same browser. It is recorded only when every frame is done: a bad frame or a cancel adds nothing.

        waitForCompletion=True: in this process; returns the segmentation node that shows the current frame.
        waitForCompletion=False: one background process serves every frame; returns the run, and
        finished(Outcome) is called at the end (Outcome.output: the segmentation node, or None)."""
        if not waitForCompletion:
            if cancel is not None:
                raise MSDSegmentError("A background run is stopped by its cancel()")
            batch = mrml.FrameBatch(volumeNode, task, modelsDir)
            return self.startInBackground(batch, task, device, precision, tta, keepLargest, modelsDir, progress,
                                          finished)
        self.installDependencies()
        return mrml.segment_sequence(volumeNode, task, device=device, tta=tta, keep_largest=keepLargest,
                                     progress=progress, cancel=cancel, models_dir=modelsDir, precision=precision)

    def startInBackground(self, batch, task, device, precision, tta, keepLargest, modelsDir, progress, finished):
        """Start one engine process (Slicer's Python) for a batch, or take the one prepareEngine started for
        these options; torch is never imported into this process."""
        self.installDependencies()
        options = self.engineOptions(task, device, precision, tta, keepLargest, modelsDir)
        standby, self.standby = self.standby, None
        return background.BackgroundSegmentation(batch, options, application.EngineProcess, self.engineProgram(),
                                                 progress, finished, standby).start()

    @staticmethod
    def engineOptions(task, device, precision, tta, keepLargest, modelsDir):
        """The engine process's options (background.worker_command's keywords)."""
        return dict(task=task, device=device, precision=precision, tta=tta, keep_largest=keepLargest,
                    models_dir=modelsDir)

    @staticmethod
    def engineProgram():
        """The engine process's program, run by Slicer's Python."""
        return background.worker_program(application.python_executable())

    def prepareEngine(self, task, device="auto", precision="auto", tta=False, keepLargest=True, modelsDir=None):
        """Start the engine process of the next background run with these options now: it loads PyTorch and the
        task's networks and runs them once while nothing waits, and that run takes it over. Replaces one started
        for other options; does nothing before the packages are installed (the run installs them first)."""
        options = self.engineOptions(task, device, precision, tta, keepLargest, modelsDir)
        program = self.engineProgram()
        if self.standby is not None and self.standby.serves(options, program):
            return self.standby
        self.releaseEngine()
        if dependencies.torch_needed() or dependencies.unmet_requirements():
            return None
        self.standby = background.StandbyEngine(options, application.EngineProcess, program)
        return self.standby

    def releaseEngine(self):
        """Stop the engine process started ahead of a run, if any (its memory is freed)."""
        if self.standby is not None:
            self.standby.stop()
            self.standby = None

    @staticmethod
    def segmentVolumes(segmentationNode):
        """[(segment name, colour, volume in mL)]."""
        return mrml.segment_volumes_ml(segmentationNode)

    @staticmethod
    def showSurfaces(segmentationNode, show=True, smoothing=0.5):
        """Build (with this smoothing factor, 0-1) or remove the segments' 3-D surfaces."""
        mrml.show_surfaces(segmentationNode, show, smoothing)

    @staticmethod
    def updateSurfaceSmoothing(segmentationNode, smoothing):
        """Rebuild the surfaces with this smoothing if they are shown; returns whether they were rebuilt."""
        return mrml.update_surface_smoothing(segmentationNode, smoothing)

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
        report(text), if given, is told what is being installed (each step blocks for a while)."""
        application.install_dependencies(askConfirmation, report)


#
# MSDSegmentTest
#


class MSDSegmentTest(ScriptedLoadableModuleTest):
    """Inside Slicer: a check of the logic and the parameter node, then the module's logic tests (the same bodies
    pytest runs with slicer-core, in MSDSegment/Testing/Python) where the module runs from its source tree.
    ctest runs those from the source tree too (MSDSegment/Testing/Python/CMakeLists.txt)."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_parameter_node_defaults()
        testsFolder = os.path.join(os.path.dirname(os.path.abspath(__file__)), "Testing", "Python")
        if not os.path.isfile(os.path.join(testsFolder, "MSDSegmentModuleTest.py")):
            self.delayDisplay("The logic tests live in the source tree (MSDSegment/Testing/Python): not run here")
            return
        if testsFolder not in sys.path:
            sys.path.insert(0, testsFolder)
        import MSDSegmentModuleTest

        MSDSegmentModuleTest.runLogicTests(self)

    def test_parameter_node_defaults(self):
        node = MSDSegmentLogic().getParameterNode()
        self.assertIn(node.task, modelcard.TASKS)
        self.assertFalse(node.allFrames or node.show3D)
        self.delayDisplay("Parameter node checked")
