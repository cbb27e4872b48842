"""Cases per minute for a cohort: a loop of single command-line calls, `--output-dir` in one process, and
`--cluster local:1` and `local:2` (Ray), side by side in one run on the same real CTs, with the peak memory of each
process or worker.

Inputs: the first --cases BTCV CTs (../shared/data/BTCV-Abdomen, whole volumes as stored, 257 x 257 x 86-199
voxels), segmented with the shipped spleen model (`--task`). Each mode writes into a folder of its own; the
label maps of every mode are checked to be identical to the loop's. Wall time is the whole mode, start-up
included (as a user meets it); the peak RSS of a process is os.wait4's, a Ray worker's its own ru_maxrss at its
last case (from summary.json). The table is printed and written to bench/cluster-latest.md; the machine's load
average is recorded before and after each mode, since other work on the machine slows every mode alike.
Target (issue 33): on 2 cores, local:2 >= 1.3 x the loop's cases per minute. Not part of `make test`.
"""

import argparse
import datetime
import glob
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

BENCH = os.path.dirname(os.path.abspath(__file__))
REPOSITORY = os.path.dirname(BENCH)
DATA = os.environ.get("MSDSEGMENT_DATA", os.path.join(os.path.dirname(REPOSITORY), "shared", "data"))
TARGET_SPEED_UP = 1.3
MODES = ("loop of single calls", "--output-dir", "--cluster local:1", "--cluster local:2")


def engine_environment():
    return dict(os.environ, PYTHONPATH=os.pathsep.join(
        [os.path.join(REPOSITORY, "MSDSegment"), REPOSITORY, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))


def run_measured(arguments, log):
    """(exit code, wall seconds, peak RSS in GB) of one `python -m MSDSegmentLib segment` process."""
    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "MSDSegmentLib", "segment"] + arguments,
                               env=engine_environment(), stdout=log, stderr=log)
    _, status, usage = os.wait4(process.pid, 0)
    return os.waitstatus_to_exitcode(status), time.perf_counter() - started, usage.ru_maxrss / 2**20


def load_average():
    return "/".join(f"{value:.1f}" for value in os.getloadavg())


def measure(mode, inputs, folder, task, log):
    """{"mode", "seconds", "cases per min", "peak GB" (per process or worker), "load"}."""
    before = load_average()
    common = ["--task", task, "--quiet"]
    if mode == MODES[0]:
        seconds, peaks = 0.0, []
        for path in inputs:
            output = os.path.join(folder, os.path.basename(path))
            code, wall, peak = run_measured(common + ["--output", output, path], log)
            assert code == 0, f"{mode}: exit code {code} (see {log.name})"
            seconds += wall
            peaks.append(peak)
        memory = f"{max(peaks):.2f} (each process)"
    else:
        extra = [] if mode == MODES[1] else ["--cluster", mode.split()[-1]]
        code, seconds, peak = run_measured(common + ["--output-dir", folder] + extra + inputs, log)
        assert code == 0, f"{mode}: exit code {code} (see {log.name})"
        memory = f"{peak:.2f} (the process)"
        if extra:
            with open(os.path.join(folder, "summary.json"), encoding="utf-8") as stream:
                rows = json.load(stream)["cases"]
            workers = {}
            for row in rows:
                workers[row["worker"]] = max(workers.get(row["worker"], 0.0), row["peak_rss_mb"] / 1024)
            memory = (f"driver {peak:.2f}; workers " + ", ".join(f"{value:.2f}" for value in sorted(workers.values())))
    return {"mode": mode, "seconds": seconds, "cases per min": len(inputs) / seconds * 60, "peak GB": memory,
            "load": f"{before} -> {load_average()}"}


def same_outputs(folders, inputs):
    """Whether every mode wrote the loop's label maps, voxel for voxel."""
    import SimpleITK as sitk

    for path in inputs:
        name = os.path.basename(path)
        arrays = [sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(folder, name))) for folder in folders]
        if any(not np.array_equal(arrays[0], array) for array in arrays[1:]):
            return False
    return True


def report(rows, inputs, task, identical):
    import torch

    loop = rows[0]["cases per min"]
    lines = [
        f"Cohort benchmark ({datetime.date.today()}): `msdsegment segment --task {task}` on {len(inputs)} BTCV CTs "
        f"({', '.join(os.path.basename(p) for p in inputs)}), whole volumes as stored.",
        f"Machine: {os.cpu_count()} CPU cores, no GPU, torch {torch.__version__}, Python "
        f"{platform.python_version()}. Load average (1/5/15 min) before -> after each mode; the machine is shared, "
        "and other work on it slows every mode.",
        "",
        "| mode | wall s | cases/min | vs loop | peak RSS GB | load average |",
        "|---|---:|---:|---:|---|---|",
    ]
    for row in rows:
        lines.append(f"| {row['mode']} | {row['seconds']:.1f} | {row['cases per min']:.2f} | "
                     f"{row['cases per min'] / loop:.2f} | {row['peak GB']} | {row['load']} |")
    speed_up = rows[-1]["cases per min"] / loop
    lines += ["", f"- local:2 vs the loop of single calls: {speed_up:.2f} x (target >= {TARGET_SPEED_UP}: "
              f"{'met' if speed_up >= TARGET_SPEED_UP else 'NOT met'})",
              f"- label maps identical in every mode, voxel for voxel: {'yes' if identical else 'NO'}"]
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=6)
    parser.add_argument("--task", default="spleen")
    parser.add_argument("--out", default=os.path.join(BENCH, "cluster-latest.md"))
    args = parser.parse_args(argv)
    inputs = sorted(glob.glob(os.path.join(DATA, "BTCV-Abdomen", "imagesTr", "*.nii.gz")))[:args.cases]
    if len(inputs) < args.cases:
        sys.exit(f"needs {args.cases} BTCV CTs in {os.path.join(DATA, 'BTCV-Abdomen', 'imagesTr')} "
                 "(set MSDSEGMENT_DATA to the folder holding BTCV-Abdomen)")
    work = tempfile.mkdtemp(prefix="msdsegment-bench-cluster-")
    rows, folders = [], []
    try:
        with open(os.path.join(work, "log.txt"), "w") as log:
            for mode in MODES:
                folder = os.path.join(work, str(len(folders)))
                os.makedirs(folder)
                folders.append(folder)
                print(f"{mode} ...", flush=True)
                rows.append(measure(mode, inputs, folder, args.task, log))
                print(f"  {rows[-1]['seconds']:.1f} s, {rows[-1]['cases per min']:.2f} cases/min", flush=True)
        text = report(rows, inputs, args.task, same_outputs(folders, inputs))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(text)
    with open(args.out, "w", encoding="utf-8") as stream:
        stream.write(text)


if __name__ == "__main__":
    main()
