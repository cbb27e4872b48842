"""`python -m MSDSegmentLib.worker --task ...`: one engine process that serves a whole batch (the Slicer module's
background runner, MSDSegmentLib.background, starts it).

One process serves every volume of a batch or every frame of a sequence, so PyTorch and the networks are loaded
once. It talks in JSON lines (see background.py for the other side):
- standard input: one job per line, `{"job": id, "inputs": [paths], "output": path}`, then `{"end": true}`.
  End-of-file before `end` means cancel: the process exits at once, even inside a network call.
- standard output: lines `MSDSEGMENT {"event": ...}`: `progress` (job, fraction, stage), `done` (job, warnings,
  pid) and `failed` (job, error: the one-line reason, details: the traceback, pid); with --standby, `ready`
  (pid, and error where the warm-up failed) once the networks are loaded. Other output is not part of it.
--standby: the process is started before its jobs exist (the panel starts it when it is shown and after each run):
it loads the task's networks and runs each once (engine.warm_up) while nobody waits, so that the first job costs
what a later one does. Jobs that arrive meanwhile wait for it.
A job fails alone, whatever it raises (an input the engine refuses, a RuntimeError or a MemoryError from torch
or numpy): the next job runs.
"""

import argparse
import json
import os
import queue
import sys
import threading
import traceback

from .errors import describe_error
from .network import leave_out_monai_extras

EVENT_PREFIX = "MSDSEGMENT "
EXIT_CANCELLED = 130  # as the command line: stopped on request


def build_parser():
    parser = argparse.ArgumentParser(prog="python -m MSDSegmentLib.worker",
                                     description="Serve segmentation jobs read from standard input (JSON lines).")
    parser.add_argument("--task", required=True)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    parser.add_argument("--tta", action="store_true")
    parser.add_argument("--no-largest", action="store_true")
    parser.add_argument("--models-dir")
    parser.add_argument("--standby", action="store_true", help="load and warm up the networks before any job")
    return parser


def emit(event, **fields):
    print(EVENT_PREFIX + json.dumps(dict(event=event, **fields)), flush=True)


def read_jobs(jobs):
    """Put each job on `jobs` and None at `end`. End-of-file, before or after `end`, is a cancel: the process
    exits at once (the runner closes this input only to cancel; a finished batch exits by itself)."""
    for line in sys.stdin:
        if line.strip():
            try:
                message = json.loads(line)
            except ValueError:
                print(f"msdsegment: error: not a job line: {line.strip()[:200]}", file=sys.stderr, flush=True)
                os._exit(2)
            jobs.put(None if message.get("end") else message)
    sys.stdout.flush()
    os._exit(EXIT_CANCELLED)


def run_job(job, args):
    from .cli import segment_case  # the command line's own case runner: same checks, outputs and summary

    def progress(fraction, stage):
        emit("progress", job=job["job"], fraction=round(float(fraction), 4), stage=stage)

    try:
        segment_case(job["inputs"], job["output"], args, say=lambda text: None, progress=progress)
        with open(os.path.splitext(job["output"])[0] + ".json", encoding="utf-8") as stream:
            warnings = json.load(stream).get("warnings", [])
    except Exception as error:  # any failure stays with its own job
        emit("failed", job=job["job"], error=describe_error(error), details=traceback.format_exc(), pid=os.getpid())
        return
    emit("done", job=job["job"], warnings=warnings, pid=os.getpid())


def warm_up(args):
    """Load and run the task's networks once; a failure is reported, and left for the jobs to meet again."""
    from .engine import warm_up as warm_up_networks

    try:
        warm_up_networks(args.task, args.device, args.precision, args.models_dir)
    except Exception as error:
        emit("ready", pid=os.getpid(), error=describe_error(error))
        return
    emit("ready", pid=os.getpid())


def main(argv=None):
    args = build_parser().parse_args(argv)
    args.quiet, args.progress_lines = True, False  # what segment_case reads besides the options above
    jobs = queue.Queue()
    threading.Thread(target=read_jobs, args=(jobs,), name="job-reader", daemon=True).start()
    if args.standby:
        warm_up(args)
    while True:
        job = jobs.get()
        if job is None:
            return 0
        run_job(job, args)


if __name__ == "__main__":
    leave_out_monai_extras()  # this process is the engine's own
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # as the command line: skip tearing down PyTorch
