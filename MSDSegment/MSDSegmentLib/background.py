"""Running the engine's command line in a background process for the Slicer module (no Qt, no slicer).

The module writes its input volumes to a temporary folder, starts `python -m MSDSegmentLib segment ...`
with Slicer's Python, reads `PROGRESS <fraction> <stage>` lines from its standard output, and imports
the label map the process wrote. This file holds the parts of that exchange that can be tested alone.
"""

import os
import re
import shutil
import tempfile

PROGRESS_LINE = re.compile(r"^PROGRESS\s+(?P<fraction>[0-9.eE+-]+)\s*(?P<stage>.*)$")
ERROR_PREFIX = re.compile(r"^msdsegment:\s*(error|warning):\s*")
OUTPUT_NAME = "labels.nrrd"
MODULE_FOLDER = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # holds MSDSegmentLib/


def segment_arguments(task, inputs, output, device="auto", tta=False, keep_largest=True, models_dir=None,
                      precision="auto"):
    """Arguments after the Python executable for one case, with machine-readable progress."""
    arguments = ["-m", "MSDSegmentLib", "segment", "--task", task, "--output", output, "--device", device,
                 "--precision", precision, "--progress-lines", "--exit-when-stdin-closes"]
    if tta:
        arguments.append("--tta")
    if not keep_largest:
        arguments.append("--no-largest")
    if models_dir:
        arguments += ["--models-dir", models_dir]
    return arguments + list(inputs)


def python_path(existing=""):
    """PYTHONPATH for the process: the module folder first, so it finds this MSDSegmentLib."""
    return os.pathsep.join([MODULE_FOLDER] + ([existing] if existing else []))


def parse_progress(line):
    """(fraction, stage text) for a progress line, None for any other line."""
    match = PROGRESS_LINE.match(line.strip())
    if not match:
        return None
    try:
        fraction = float(match.group("fraction"))
    except ValueError:
        return None
    return min(max(fraction, 0.0), 1.0), match.group("stage").strip()


def error_message(stderr_text, exit_code):
    """The one line to show when the process failed: its last error line, else its exit code."""
    lines = [line.strip() for line in stderr_text.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("msdsegment: error:")]
    line = (errors or lines or [""])[-1]
    return ERROR_PREFIX.sub("", line) or f"The segmentation process stopped with exit code {exit_code}"


def warnings_in(stderr_text):
    return [ERROR_PREFIX.sub("", line.strip()) for line in stderr_text.splitlines()
            if line.strip().startswith("msdsegment: warning:")]


class Workspace:
    """A temporary folder for one run's input and output files, removed when the run ends."""

    def __init__(self):
        self.folder = tempfile.mkdtemp(prefix="MSDSegment-")
        self.output = os.path.join(self.folder, OUTPUT_NAME)

    def remove(self):
        shutil.rmtree(self.folder, ignore_errors=True)
