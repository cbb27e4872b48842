"""The Slicer module's background runner: one engine process serves a batch (no Qt, no slicer here).

Every run from the panel, and a script's run with waitForCompletion=False, goes through BackgroundSegmentation:
it writes each input to a temporary folder, starts one `python -m MSDSegmentLib.worker` for the whole batch
(Slicer's Python, so torch is never imported into Slicer's own process), sends it one JSON line per job, and
imports each result as the worker reports it done. A job that fails, whatever it raised, fails alone; if the
process itself dies (a crash, the system's out-of-memory killer), the job it was on fails with its last error
line and a new process takes the jobs left. Cancel closes the worker's standard input and kills it: the
results already imported stay.

What is done with the scene is the batch's business (MSDSegmentLib.mrml: VolumeBatch, FrameBatch), and the
process is started by a transport: the module's QProcess glue in Slicer, SubprocessTransport elsewhere.
"""

import json
import os
import queue
import re
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field

from .errors import MSDSegmentError, describe_error
from .worker import EVENT_PREFIX

ERROR_PREFIX = re.compile(r"^msdsegment:\s*(error|warning):\s*")
OUTPUT_NAME = "labels.nrrd"
MODULE_FOLDER = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # holds MSDSegmentLib/


def worker_program(python):
    """The engine process's program: `python -m MSDSegmentLib.worker` (python: PythonSlicer in Slicer)."""
    return [python, "-m", "MSDSegmentLib.worker"]


def worker_command(program, task, device="auto", precision="auto", tta=False, keep_largest=True, models_dir=None,
                   standby=False):
    """The command line of the engine process that serves one batch of a task's jobs (standby: started ahead of
    them, see StandbyEngine)."""
    command = list(program) + ["--task", task, "--device", device, "--precision", precision]
    if tta:
        command.append("--tta")
    if not keep_largest:
        command.append("--no-largest")
    if models_dir:
        command += ["--models-dir", models_dir]
    if standby:
        command.append("--standby")
    return command


def start_engine(transport, handler, command):
    """An engine process running `command` through `transport`, reporting to `handler`."""
    process = transport(handler)
    process.start(command, {"PYTHONPATH": python_path(os.environ.get("PYTHONPATH", ""))}, MODULE_FOLDER)
    return process


def job_line(job, inputs, output):
    return json.dumps({"job": job, "inputs": list(inputs), "output": output}) + "\n"


END_LINE = json.dumps({"end": True}) + "\n"


def parse_event(line):
    """The worker's event in a line of its standard output, None for any other line."""
    line = line.strip()
    if not line.startswith(EVENT_PREFIX):
        return None
    try:
        event = json.loads(line[len(EVENT_PREFIX):])
    except ValueError:
        return None
    return event if isinstance(event, dict) and "event" in event else None


def events_in(text):
    """(the worker's events in the complete lines of `text`, the incomplete last line to keep for later output)."""
    *lines, rest = text.split("\n")
    return [event for event in map(parse_event, lines) if event is not None], rest


def python_path(existing=""):
    """PYTHONPATH for the process: the module folder first, so it finds this MSDSegmentLib."""
    return os.pathsep.join([MODULE_FOLDER] + ([existing] if existing else []))


def error_message(stderr_text, exit_code):
    """The one line to show when the process failed: its last error line, else its exit code."""
    lines = [line.strip() for line in stderr_text.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("msdsegment: error:")]
    line = (errors or lines or [""])[-1]
    return ERROR_PREFIX.sub("", line) or f"The segmentation process stopped with exit code {exit_code}"


class Workspace:
    """A temporary folder for one run's input and output files, removed when the run ends."""

    def __init__(self):
        self.folder = tempfile.mkdtemp(prefix="MSDSegment-")
        self.output = os.path.join(self.folder, OUTPUT_NAME)

    def remove(self):
        shutil.rmtree(self.folder, ignore_errors=True)


@dataclass
class Outcome:
    """What a background run did, job by job (a job: a volume of a batch, or a frame of a sequence)."""

    names: list                                   # each job's name, for messages
    results: list                                 # the batch's result for each job, None where none
    errors: dict = field(default_factory=dict)    # job index -> MSDSegmentError (.details: the engine's traceback)
    warnings: list = field(default_factory=list)  # "name: warning" from the engine
    notes: list = field(default_factory=list)     # what the batch adds (e.g. a sequence was not recorded)
    cancelled: bool = False
    processes: list = field(default_factory=list)  # the engine process that reported each job (its pid)
    output: object = None                         # the segmentation node to show: the last done, or the sequence's

    @property
    def done(self):
        return [result for result in self.results if result is not None]

    def report(self):
        """The panel's status text: how many of how many are in the scene, each failure and warning in a line."""
        lines = [f"Done: {len(self.done)} of {len(self.results)} segmented."
                 + (" Cancelled: the rest was not segmented." if self.cancelled else "")]
        lines += [f"Failed: {self.names[index]}: {error}" for index, error in sorted(self.errors.items())]
        lines += self.notes + [f"Warning: {warning}" for warning in self.warnings]
        return "\n".join(lines)


class BackgroundSegmentation:
    """One engine process (or, after a crash, a new one) serving every job of a batch; see the module's docstring.

    batch: names (one per job), prepare(index, folder) -> input files (raises: the job fails without the
    engine), collect(index, label file) -> the job's result in the scene (raises: the job fails),
    complete(outcome) at the end (sets outcome.output). transport(handler) -> the process (start, write, stop,
    pump). progress(fraction of the batch, text naming the job, its share done and its stage);
    finished(Outcome) once, at the end. Callbacks and the batch run in the thread that pumps the transport
    (Qt's main thread in Slicer), so MRML is touched there only."""

    def __init__(self, batch, options, transport, program, progress=None, finished=None, standby=None):
        self.batch = batch
        self.standby = standby  # a StandbyEngine started ahead of this run, taken if it serves these options
        self.options = options  # task, device, precision, tta, keep_largest, models_dir
        self.transport = transport
        self.program = program
        self.progress = progress
        self.onFinished = finished
        self.outcome = Outcome(list(batch.names), [None] * len(batch.names))
        self.jobs = {}  # job index -> (input files, label file) of the jobs given to the engine
        self.pending = []  # job indexes sent to the engine and not yet reported, in the order it runs them
        self.process = None
        self.workspace = None
        self.output_text = ""
        self.error_text = ""
        self.ended = False

    # Starting

    def start(self):
        self.workspace = Workspace()
        jobs = []
        for index in range(len(self.outcome.names)):
            folder = os.path.join(self.workspace.folder, str(index))
            os.makedirs(folder)
            try:
                jobs.append((index, self.batch.prepare(index, folder), os.path.join(folder, OUTPUT_NAME)))
            except Exception as error:  # this input cannot be written: it alone fails
                self.fail(index, error)
        self.jobs = {index: (inputs, output) for index, inputs, output in jobs}
        if not jobs:
            self.end()
            return self
        try:
            self.launch([index for index, _, _ in jobs])
        except Exception:  # the engine cannot start: nothing ran, nothing is left behind
            self.workspace.remove()
            raise
        return self

    def launch(self, indexes):
        self.pending = list(indexes)
        self.output_text = self.error_text = ""
        standby, self.standby = self.standby, None  # only the first process can be one started ahead
        self.process = standby.hand_over(self, self.options, self.program) if standby is not None else None
        try:
            if self.process is None:
                self.process = start_engine(self.transport, self, worker_command(self.program, **self.options))
            for index in indexes:
                self.process.write(job_line(index, *self.jobs[index]))
            self.process.write(END_LINE)
        except Exception:
            self.process.stop()
            self.process = None
            raise

    # Events from the process (in the pumping thread)

    def on_output(self, text):
        events, self.output_text = events_in(self.output_text + text)
        for event in events:
            if event.get("job") in self.pending:
                self.handle(event)

    def on_errors(self, text):
        self.error_text += text

    def handle(self, event):
        index = event["job"]
        name = self.outcome.names[index]
        if event["event"] == "progress":
            self.report(index, float(event.get("fraction", 0.0)), event.get("stage", ""))
            return
        self.pending.remove(index)
        self.outcome.processes.append(event.get("pid"))
        if event["event"] == "done":
            self.outcome.warnings += [f"{name}: {warning}" for warning in event.get("warnings", [])]
            try:
                self.outcome.results[index] = self.batch.collect(index, self.jobs[index][1])
            except Exception as error:
                self.fail(index, error)
        else:
            self.fail(index, MSDSegmentError(event.get("error") or "The engine failed"), event.get("details", ""))
        self.report(index, 1.0, "done" if event["event"] == "done" else "failed")

    def on_exit(self, exit_code, crashed):
        """The process ended: the jobs it did not report failed (crash) or were not run (cancel)."""
        self.on_output("\n")
        self.process = None
        if self.pending and not self.outcome.cancelled:
            message = error_message(self.error_text, exit_code) if exit_code or crashed else \
                "The engine process stopped without reporting this job"
            self.fail(self.pending[0], MSDSegmentError(message), self.error_text)
            left = self.pending[1:]
            if left:  # a crash takes only the job it was on: a new process serves the others
                try:
                    self.launch(left)
                    return
                except Exception as error:
                    for index in left:
                        self.fail(index, error)
        self.end()

    # Results

    def fail(self, index, error, details=""):
        message = error if isinstance(error, MSDSegmentError) else MSDSegmentError(describe_error(error))
        message.details = details or getattr(error, "details", "") or ""
        self.outcome.errors[index] = message

    def report(self, index, fraction, stage):
        if self.progress is None:
            return
        count = len(self.outcome.names)
        finished = sum(1 for i in range(count)
                       if i != index and (self.outcome.results[i] is not None or i in self.outcome.errors))
        overall = min((finished + fraction) / count, 1.0)
        self.progress(overall, f"{self.outcome.names[index]} ({index + 1} of {count}), {fraction:.0%}: {stage}")

    def end(self):
        if self.ended:
            return
        self.ended = True
        try:
            self.batch.complete(self.outcome)
        except Exception as error:  # the batch could not record its results: say so, keep what is there
            self.outcome.notes.append(f"Failed: {describe_error(error)}")
        finally:
            if self.workspace is not None:
                self.workspace.remove()
        if self.onFinished is not None:
            self.onFinished(self.outcome)

    # Control

    def cancel(self):
        """Stop the engine at once; what finished stays. The worker exits when its standard input closes
        (under Slicer's launcher, killing the process started would leave the real interpreter running)."""
        self.outcome.cancelled = True
        if self.process is not None:
            self.process.stop()

    def running(self):
        return not self.ended

    def wait(self, timeout=None):
        """Block until the run has ended, pumping the transport's events (scripts; tests)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.ended:
            if deadline is not None and time.monotonic() > deadline:
                self.cancel()
                raise MSDSegmentError(f"The segmentation did not end within {timeout} s: cancelled")
            if self.process is not None:
                self.process.pump(0.1)
        return self.outcome


class StandbyEngine:
    """An engine process started before the run it will serve (`worker --standby`): it imports PyTorch and MONAI,
    loads the task's networks and runs them once while the user is still choosing, so that the run's first volume
    costs what a later one does. A BackgroundSegmentation given it takes it over when it was started with the
    same options and is still running; otherwise the run starts its own process and this one is stopped.
    Until then it reports to this object, which keeps what it said on its error stream (a crash's last line)."""

    def __init__(self, options, transport, program):
        self.options, self.program = dict(options), list(program)
        self.error_text = self.output_text = ""
        self.ready_event = None  # the worker's `ready` event once it has come
        self.process = start_engine(transport, self, worker_command(self.program, standby=True, **self.options))

    def serves(self, options, program):
        return self.process is not None and self.process.alive() and \
            dict(options) == self.options and list(program) == self.program

    def hand_over(self, handler, options, program):
        """The running process, now reporting to `handler`, if it serves these options; else None (and stopped)."""
        if not self.serves(options, program):
            self.stop()
            return None
        process, self.process = self.process, None
        process.handler = handler
        if self.error_text:
            handler.on_errors(self.error_text)
        return process

    def stop(self):
        if self.process is not None:
            self.process.stop()
            self.process = None

    # Events from the process while it waits

    def on_output(self, text):
        events, self.output_text = events_in(self.output_text + text)
        self.ready_event = next((event for event in events if event["event"] == "ready"), self.ready_event)

    def on_errors(self, text):
        self.error_text += text

    def on_exit(self, exit_code, crashed):
        self.process = None

    def wait_until_ready(self, timeout=None):
        """Pump the transport until the networks are loaded (scripts, tests): the `ready` event, or None if the
        process ended first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.ready_event is None and self.process is not None:
            if deadline is not None and time.monotonic() > deadline:
                raise MSDSegmentError(f"The engine process was not ready within {timeout} s")
            self.process.pump(0.1)
        return self.ready_event


class SubprocessTransport:
    """The engine process through `subprocess` (outside Qt): threads read its pipes, pump() hands what they read
    to the runner in the caller's thread."""

    def __init__(self, handler):
        self.handler = handler
        self.events = queue.Queue()
        self.process = None

    def start(self, command, environment, folder):
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, cwd=folder, env=dict(os.environ, **environment))
        readers = [threading.Thread(target=self.read, args=(stream, kind), daemon=True)
                   for stream, kind in ((self.process.stdout, "out"), (self.process.stderr, "err"))]
        for reader in readers:
            reader.start()
        threading.Thread(target=self.watch, args=(readers,), daemon=True).start()

    def read(self, stream, kind):
        for chunk in iter(lambda: stream.read1(65536), b""):
            self.events.put((kind, chunk.decode("utf-8", "replace")))

    def watch(self, readers):
        for reader in readers:
            reader.join()
        self.events.put(("exit", self.process.wait()))

    def write(self, text):
        self.process.stdin.write(text.encode("utf-8"))
        self.process.stdin.flush()

    def alive(self):
        return self.process is not None and self.process.poll() is None

    def stop(self):
        if self.process is None:
            return
        try:
            self.process.stdin.close()
        except OSError:
            pass
        self.process.kill()

    def pump(self, seconds):
        try:
            kind, value = self.events.get(timeout=seconds)
        except queue.Empty:
            return
        if kind == "out":
            self.handler.on_output(value)
        elif kind == "err":
            self.handler.on_errors(value)
        else:
            self.handler.on_exit(value, value < 0)
