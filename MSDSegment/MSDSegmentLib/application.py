"""What needs Slicer's application (Qt, slicer.util): the engine's process for the background runner, Slicer's
Python interpreter, installing the packages the engine needs with Slicer's pip, and loading the segments'
terminology into the Terminologies module.

Thin on purpose: the runner itself (MSDSegmentLib.background) and the checks of what is installed
(MSDSegmentLib.dependencies) work, and are tested, without Qt.
"""

import logging
import os
import shutil
import tempfile
import time

import qt
import slicer

from . import dependencies, terminology
from .errors import MSDSegmentError


class EngineProcess:
    """The engine's QProcess for background.BackgroundSegmentation: Qt delivers its output and its end in the main
    thread, so the runner touches MRML there only."""

    def __init__(self, handler):
        self.handler = handler  # the BackgroundSegmentation it reports to
        self.process = None

    def start(self, command, environment, folder) -> None:
        self.process = qt.QProcess()
        processEnvironment = qt.QProcessEnvironment.systemEnvironment()
        for name, value in environment.items():
            processEnvironment.insert(name, value)
        self.process.setProcessEnvironment(processEnvironment)
        self.process.setWorkingDirectory(folder)
        self.process.connect("readyReadStandardOutput()", self.readOutput)
        self.process.connect("readyReadStandardError()", self.readErrors)
        self.process.connect("finished(int,QProcess::ExitStatus)", self.finished)
        self.process.start(command[0], command[1:])
        if not self.process.waitForStarted(10000):
            reason = self.process.errorString()
            self.release()
            raise MSDSegmentError(f"Cannot start {command[0]}: {reason}")

    def write(self, text) -> None:
        self.process.write(qt.QByteArray(text.encode("utf-8")))

    def alive(self) -> bool:
        return self.process is not None and self.process.state() == qt.QProcess.Running

    def stop(self) -> None:
        """Close the engine's standard input, then kill the process started. PythonSlicer is a launcher whose
        child, python-real, runs the engine: killing the launcher alone would leave it running, but the child
        shares its standard input and exits when that closes."""
        if self.process is not None and self.process.state() != qt.QProcess.NotRunning:
            self.process.closeWriteChannel()
            self.process.kill()  # finished() follows

    def pump(self, seconds) -> None:
        slicer.app.processEvents()
        time.sleep(seconds)

    def readOutput(self) -> None:
        self.handler.on_output(self.process.readAllStandardOutput().data().decode("utf-8", "replace"))

    def readErrors(self) -> None:
        self.handler.on_errors(self.process.readAllStandardError().data().decode("utf-8", "replace"))

    def finished(self, exitCode, exitStatus) -> None:
        self.readOutput()
        self.readErrors()
        self.release()
        self.handler.on_exit(exitCode, exitStatus != qt.QProcess.NormalExit)

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


def python_executable():
    """Slicer's own Python interpreter (PythonSlicer), which sees the packages installed in Slicer."""
    executable = shutil.which("PythonSlicer")
    if not executable:
        raise MSDSegmentError("Slicer's Python interpreter (PythonSlicer) was not found on the PATH")
    return executable


def install_dependencies(askConfirmation=True, report=None):
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
        install_torch(askConfirmation)
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


def install_torch(askConfirmation=True):
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


def load_terminology():
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
