"""`make bench`: end-to-end command-line time and peak memory per CT task on a realistic large CT.

The input is a 512 x 512 x 200 CT at 0.8 x 0.8 x 2.5 mm built from a real CT (TotalSegmentator's
abdomen-and-pelvis example_ct.nii.gz, downloaded once from PyPI, see scripts/example_data.py), so the
network, resampling and post-processing see real anatomy and real organ sizes. Each task runs as its own
`python -m MSDSegmentLib segment` process (so model loading is measured as users meet it), pinned to
--cores CPU cores; wall time and peak RSS come from os.wait4 for that one process, the per-stage split
from the summary JSON the command line writes. Each task runs with fp32 forced and with `--precision auto`
side by side (auto is what users get; fp32 is what a CPU without bf16 gets). A second table gives each stage's
share of the wall time and the overhead ratio, (wall - network) / network: what everything around the network
costs per second of network, held to OVERHEAD_TARGET for `auto`. Three more figures explain that ratio: the
same ratio for the cases after the first in one process (the engine already loaded), the panel's case (an
engine process started ahead of the click, `worker --standby`), and how long a fresh interpreter takes to import
PyTorch and MONAI, against each network. The `auto` fresh processes, the engine-running cases and the panel's are
each measured --repeats times (median and range). The tables are printed and written to bench/latest.md. Not
part of `make test`.
"""

import argparse
import datetime
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
sys.path.insert(0, os.path.join(REPOSITORY, "scripts"))

import example_data  # noqa: E402
from demo import engine_environment, missing_models  # noqa: E402
from MSDSegmentLib import background, modelcard  # noqa: E402  (demo puts the engine on the path)
from MSDSegmentLib.atomic import atomic_output, write_text  # noqa: E402

GRID_SIZE = (512, 512, 200)
GRID_SPACING = (0.8, 0.8, 2.5)
CT_NOISE_HU = 12.0        # quantum noise of a 0.8 mm reconstruction, lost when upsampling a 3 mm CT
AIR_HU = -1024
STAGES = ("read", "load", "preprocess", "network", "postprocess", "write")
# Per task, end to end, on 2 cores: auto (what users get) and fp32 forced (CPUs without bf16); bf16 and fp16
# forced are measured against the auto target.
TARGET_SECONDS = {"auto": 12.0, "fp32": 18.0, "bf16": 12.0, "fp16": 12.0}
TARGET_GB = 1.5
PRECISIONS = ("fp32", "auto")
CT_TASKS = ("liver", "spleen", "pancreas", "abdomen", "organs")
SINGLE_TASKS = ("liver", "spleen", "pancreas")  # what the combined abdomen task runs at once
COMBINED_TARGET = 1.3  # the abdomen task at most 1.3 x the slowest single task
# Everything but the network, against the network: (wall - network) / network, for `auto` (what users get).
OVERHEAD_TARGET = 0.6
REPEATS = 5  # `auto` fresh processes and engine-running cases are measured this many times; median and range
CACHE = os.path.join(REPOSITORY, ".cache", "bench")


# ---------------------------------------------------------------------------------------------- input

def benchmark_grid(source, size=GRID_SIZE, spacing=GRID_SPACING):
    """An empty image of the benchmark size and spacing, with the source's direction, centred on it."""
    import SimpleITK as sitk

    grid = sitk.Image([int(n) for n in size], sitk.sitkInt16)
    grid.SetSpacing([float(s) for s in spacing])
    grid.SetDirection(source.GetDirection())
    centre = source.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2.0 for n in source.GetSize()])
    direction = np.array(source.GetDirection()).reshape(3, 3)
    half = direction @ ((np.array(size) - 1) / 2.0 * np.array(spacing))
    grid.SetOrigin([float(c) for c in np.array(centre) - half])
    return grid


def slice_stretch(source, grid):
    """Transform (grid point -> source point) that maps the grid's slice extent onto the source's.

    In-plane the anatomy keeps its true size (the wider field of view holds air, as on a scanner); along
    the slices it is stretched so that every one of the 200 slices holds anatomy (real organ shapes,
    organs taller than usual: a conservative load for resampling and post-processing).
    """
    import SimpleITK as sitk

    direction = np.array(source.GetDirection()).reshape(3, 3)
    source_extent = source.GetSize()[2] * source.GetSpacing()[2]
    grid_extent = grid.GetSize()[2] * grid.GetSpacing()[2]
    scale = np.diag([1.0, 1.0, source_extent / grid_extent])
    transform = sitk.AffineTransform(3)
    transform.SetMatrix((direction @ scale @ direction.T).ravel().tolist())
    transform.SetCenter(source.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2.0 for n in source.GetSize()]))
    return transform


def build_benchmark_ct(source_path, target_path, seed=0):
    """Resample a real CT onto the benchmark grid, add CT noise, write it (int16 NIfTI, compressed)."""
    import SimpleITK as sitk

    source = sitk.ReadImage(source_path, sitk.sitkFloat32)
    grid = benchmark_grid(source)
    image = sitk.Resample(source, grid, slice_stretch(source, grid), sitk.sitkLinear, float(AIR_HU),
                          sitk.sitkFloat32)
    array = sitk.GetArrayFromImage(image)
    array += np.random.default_rng(seed).standard_normal(array.shape, dtype=np.float32) * CT_NOISE_HU
    noisy = sitk.GetImageFromArray(np.clip(np.rint(array), -1024, 3071).astype(np.int16))
    noisy.CopyInformation(image)
    os.makedirs(os.path.dirname(target_path), exist_ok=True)
    with atomic_output(target_path, ".nii.gz") as temporary:
        sitk.WriteImage(noisy, temporary, useCompression=True)
    return target_path


def benchmark_ct(say=print):
    """The cached benchmark CT, built on first use."""
    name = "ct_{}_{}mm.nii.gz".format("x".join(map(str, GRID_SIZE)), "x".join(map(str, GRID_SPACING)))
    path = os.path.join(CACHE, name)
    if not os.path.isfile(path):
        source = example_data.example_file(example_data.ABDOMEN_PELVIS_CT, say=say)
        say(f"Building the benchmark CT {path} from {example_data.ABDOMEN_PELVIS_CT}")
        build_benchmark_ct(source, path)
    return path


# ---------------------------------------------------------------------------------------------- measuring

def peak_rss_bytes(usage):
    """ru_maxrss is in kilobytes on Linux and in bytes on macOS."""
    return usage.ru_maxrss if sys.platform == "darwin" else usage.ru_maxrss * 1024


def run_measured(command, log_path, env=None, cores=None):
    """Run one process; returns (exit code, wall seconds, peak RSS bytes) of that process alone.

    os.wait4 gives the rusage of this child (and the children it waited for), unlike
    getrusage(RUSAGE_CHILDREN), which is the maximum over every child so far.
    """
    started = time.perf_counter()
    with open(log_path, "w") as log:
        # No preexec_fn: it forces a plain fork, whose child counts the parent's pages in its peak RSS.
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        if cores and hasattr(os, "sched_setaffinity"):
            os.sched_setaffinity(process.pid, cores)  # before the child has started its worker threads
        _pid, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    return process.returncode, wall, peak_rss_bytes(usage)


def pick_cores(count):
    """The first `count` CPU cores this process may use (None where affinity is not supported)."""
    if not hasattr(os, "sched_getaffinity"):
        return None
    return sorted(os.sched_getaffinity(0))[:count]


def thread_environment(threads):
    environment = engine_environment()
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        environment[name] = str(threads)
    return environment


def segment_command(task, output_options, device, precision, models_dir=None):
    """`python -m MSDSegmentLib segment` for one task, without its inputs; output_options: ["--output", FILE] or
    ["--output-dir", FOLDER]."""
    command = [sys.executable, "-m", "MSDSegmentLib", "segment", "--task", task, *output_options,
               "--device", device, "--precision", precision, "--quiet"]
    return command + (["--models-dir", models_dir] if models_dir else [])


def measure_task(task, ct_path, work_dir, device, cores, models_dir=None, precision="auto"):
    """One fresh command-line process segmenting the benchmark CT; returns the row's figures."""
    command = segment_command(task, ["--output", os.path.join(work_dir, f"{task}.nii.gz")], device, precision,
                              models_dir) + [ct_path]
    log = os.path.join(work_dir, f"{task}.log")
    code, wall, rss = run_measured(command, log, thread_environment(len(cores) if cores else 2), cores)
    if code != 0:
        with open(log) as stream:
            lines = stream.read().strip().splitlines() or [f"exit status {code}"]
        raise RuntimeError(f"task {task} failed: {lines[-1]}")
    with open(os.path.join(work_dir, f"{task}.json"), encoding="utf-8") as stream:
        summary = json.load(stream)
    return {"task": task, "asked": precision, "precision": summary["precision"], "wall_s": wall,
            "peak_rss_bytes": rss, "timings_s": summary["timings_s"],
            "device": summary["device"], "volumes_ml": summary["volumes_ml"],
            "weights": summary["model"]["weights"], "sha256": summary["model"]["sha256"]}


def measure_fresh(task, ct_path, work_dir, device, cores, models_dir=None, precision="auto", repeats=REPEATS):
    """measure_task `repeats` times for `auto`, whose overhead ratio has a target and moves by 0.1-0.2 from one
    fresh process to the next, once for a forced precision; returns the run with the median ratio (median_run),
    with the highest peak RSS of the runs."""
    runs = [measure_task(task, ct_path, work_dir, device, cores, models_dir, precision)
            for _ in range(repeats if precision == "auto" else 1)]
    return dict(median_run(runs, overhead_ratio), peak_rss_bytes=max(run["peak_rss_bytes"] for run in runs))


def measure_imports(cores, repeats=3):
    """Median wall seconds of a fresh interpreter making the imports the engine's loader thread makes before its
    first network, in its order: PyTorch, and MONAI without the extras it does not use (importing any part of MONAI
    imports all of it; SciPy's ndimage, for post-processing, follows once the networks are loaded). It exits as the
    command line does, without tearing the interpreter down (0.4-0.5 s more here). The command line overlaps these
    imports with reading and preparing the input; they bound from below what a fresh process spends before its
    first network."""
    command = [sys.executable, "-c", "import os, torch; from MSDSegmentLib import network; "
               "network.leave_out_monai_extras(); network.import_monai(); os._exit(0)"]
    walls = []
    for _ in range(repeats):
        code, wall, _rss = run_measured(command, os.devnull, thread_environment(len(cores) if cores else 2), cores)
        if code != 0:
            raise RuntimeError(f"importing torch and monai failed (exit status {code})")
        walls.append(wall)
    return float(np.median(walls))


def median_run(runs, ratio):
    """The run with the median overhead ratio (`ratio(run)`), carrying every run's ratio, lowest first, as "ratios":
    on a shared machine one run can be 0.1-0.2 off, so the report gives the median and the range."""
    ordered = sorted(runs, key=ratio)
    return dict(ordered[len(ordered) // 2], ratios=[ratio(run) for run in ordered])


def measure_warm(task, ct_path, work_dir, device, cores, models_dir=None, precision="auto", repeats=REPEATS):
    """The same CT `repeats` + 1 times in one `--output-dir` process; returns the median of the cases after the
    first (median_run): what a batch, a cluster worker and the panel's next volume in one run spend per case once
    the engine is loaded."""
    inputs, outputs = os.path.join(work_dir, f"warm-{task}-in"), os.path.join(work_dir, f"warm-{task}-out")
    os.makedirs(inputs, exist_ok=True)
    os.makedirs(outputs, exist_ok=True)
    names = [f"case{number}" for number in range(repeats + 1)]
    for name in names:
        os.symlink(os.path.abspath(ct_path), os.path.join(inputs, name + ".nii.gz"))
    command = segment_command(task, ["--output-dir", outputs], device, precision, models_dir)
    command += [os.path.join(inputs, name + ".nii.gz") for name in names]
    log = os.path.join(work_dir, f"warm-{task}.log")
    code, _wall, _rss = run_measured(command, log, thread_environment(len(cores) if cores else 2), cores)
    if code != 0:
        raise RuntimeError(f"task {task} ({len(names)} cases in one process) failed: exit status {code}, see {log}")
    runs = []
    for name in names[1:]:
        with open(os.path.join(outputs, name + ".json"), encoding="utf-8") as stream:
            summary = json.load(stream)
        runs.append({"task": task, "asked": precision, "precision": summary["precision"],
                     "timings_s": summary["timings_s"]})
    return median_run(runs, warm_overhead_ratio)


def measure_standby(task, ct_path, work_dir, device, cores, models_dir=None, precision="auto", repeats=REPEATS):
    """The panel's path, `repeats` times, each with its own engine process; returns the median (median_run)."""
    runs = [standby_job(task, ct_path, work_dir, device, cores, models_dir, precision) for _ in range(repeats)]
    return median_run(runs, standby_overhead_ratio)


def standby_job(task, ct_path, work_dir, device, cores, models_dir=None, precision="auto"):
    """The panel's path: an engine process started ahead (`worker --standby`) loads and runs its networks; once it
    says it is ready, the CT is written as the panel writes a volume (uncompressed NRRD, mrml.write_inputs) and one
    job is sent. Returns the seconds to ready, the job's seconds from the input being written to the job's `done`
    (what the user waits for after clicking Segment) and its stage seconds."""
    import SimpleITK as sitk

    image = sitk.ReadImage(ct_path)
    folder = tempfile.mkdtemp(prefix=f"standby-{task}-", dir=work_dir)  # a folder per run, as the panel's
    panel_input = os.path.join(folder, "input.nrrd")
    options = dict(task=task, device=device, precision=precision, models_dir=models_dir)
    command = background.worker_command(background.worker_program(sys.executable), standby=True, **options)
    environment = thread_environment(len(cores) if cores else 2)
    output = os.path.join(folder, "output.nrrd")
    started = time.perf_counter()
    process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                               env=environment, cwd=background.MODULE_FOLDER, text=True)
    if cores and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(process.pid, cores)
    events = (background.parse_event(line) for line in process.stdout)
    try:
        ready = next(event for event in events if event and event["event"] == "ready")
        ready_s = time.perf_counter() - started
        if "error" in ready:
            raise RuntimeError(f"task {task}: the standby engine failed to warm up: {ready['error']}")
        started = time.perf_counter()
        sitk.WriteImage(image, panel_input, useCompression=False)
        process.stdin.write(background.job_line(0, [panel_input], output) + background.END_LINE)
        process.stdin.flush()
        ended = next(event for event in events if event and event["event"] in ("done", "failed"))
        job_s = time.perf_counter() - started
    except StopIteration:
        raise RuntimeError(f"task {task}: the standby engine stopped without reporting") from None
    finally:
        process.stdin.close()
        process.wait()
    if ended["event"] == "failed":
        raise RuntimeError(f"task {task} (standby engine) failed: {ended['error']}")
    with open(os.path.splitext(output)[0] + ".json", encoding="utf-8") as stream:
        summary = json.load(stream)
    shutil.rmtree(folder)  # as the panel removes its folder after each run
    return {"task": task, "asked": precision, "precision": summary["precision"], "timings_s": summary["timings_s"],
            "ready_s": ready_s, "job_s": job_s}


# ---------------------------------------------------------------------------------------------- report

def within_targets(row):
    """Time and memory targets of a single task; the combined task's time is held to COMBINED_TARGET instead
    (combined_lines), as it runs four networks."""
    fast = row["task"] == "abdomen" or row["wall_s"] <= TARGET_SECONDS[row["asked"]]
    return fast and row["peak_rss_bytes"] <= TARGET_GB * 1e9


def table_head(headers):
    """A markdown table's header and alignment lines: the first two columns (task, precision) left, the rest right."""
    return ["| " + " | ".join(headers) + " |", "|" + "|".join(["---", "---"] + ["---:"] * (len(headers) - 2)) + "|"]


def table_row(cells):
    return "| " + " | ".join(cells) + " |"


def ratio_verdict(ratio):
    return f"<= {OVERHEAD_TARGET}: " + ("yes" if ratio <= OVERHEAD_TARGET else "**no**")


def ratio_to_network(seconds, row):
    """(seconds - network) / network: what the work around the network costs, per second of network."""
    network = row["timings_s"].get("network", 0.0)
    return (seconds - network) / network if network > 0 else float("inf")


def markdown_table(rows):
    """One line per task and precision: stage seconds, the rest of the wall time (start-up), total, peak RSS,
    the time against fp32 for the same task, and the verdict against that precision's target."""
    lines = table_head(["Task", "precision (used)", *STAGES, "start-up", "total s", "vs fp32", "peak RSS GB",
                        "target met"])
    fp32 = {row["task"]: row["wall_s"] for row in rows if row["asked"] == "fp32"}
    for row in rows:
        stages = [row["timings_s"].get(stage, 0.0) for stage in STAGES]
        startup = max(row["wall_s"] - sum(stages), 0.0)
        ratio = f"{row['wall_s'] / fp32[row['task']]:.2f}" if row["task"] in fp32 else ""
        seconds = f"<= {COMBINED_TARGET} x slowest single task" if row["task"] == "abdomen" \
            else f"<= {TARGET_SECONDS[row['asked']]:.0f} s"
        target = f"{seconds}, {TARGET_GB} GB: " + ("yes" if within_targets(row) else "**no**")
        cells = [row["task"], f"{row['asked']} ({row['precision']})", *(f"{s:.1f}" for s in stages), f"{startup:.1f}",
                 f"{row['wall_s']:.1f}", ratio, f"{row['peak_rss_bytes'] / 1e9:.2f}", target]
        lines.append(table_row(cells))
    return "\n".join(lines)


def overhead_ratio(row):
    """(wall - network) / network of a fresh process."""
    return ratio_to_network(row["wall_s"], row)


def share_table(rows):
    """One line per task and precision: each stage's share of the wall time (start-up: the rest) and the
    overhead ratio, against its target for `auto`."""
    lines = table_head(["Task", "precision (used)", *STAGES, "start-up", "overhead ratio", "ratio range",
                        "target met"])
    for row in rows:
        stages = [row["timings_s"].get(stage, 0.0) for stage in STAGES]
        startup = max(row["wall_s"] - sum(stages), 0.0)
        shares = [f"{100 * seconds / row['wall_s']:.0f} %" for seconds in stages + [startup]]
        ratio = overhead_ratio(row)
        target = ratio_verdict(ratio) if row["asked"] == "auto" else ""
        lines.append(table_row([row["task"], f"{row['asked']} ({row['precision']})", *shares, f"{ratio:.2f}",
                                ratio_range(row), target]))
    return "\n".join(lines)


def ratio_range(row):
    """The lowest and highest overhead ratio of a row's runs (median_run), or "" for a single run."""
    ratios = row.get("ratios", [])
    return f"{ratios[0]:.2f}-{ratios[-1]:.2f}" if len(ratios) > 1 else ""


def warm_table(warm_rows):
    """A case after the first in one process: stage seconds and the overhead ratio over the timed stages."""
    lines = table_head(["Task", "precision (used)", *STAGES, "overhead ratio", "ratio range", "target met"])
    for row in warm_rows:
        stages = [row["timings_s"].get(stage, 0.0) for stage in STAGES]
        ratio = warm_overhead_ratio(row)
        lines.append(table_row([row["task"], f"{row['asked']} ({row['precision']})",
                                *(f"{seconds:.1f}" for seconds in stages), f"{ratio:.2f}", ratio_range(row),
                                ratio_verdict(ratio)]))
    return "\n".join(lines)


def warm_overhead_ratio(row):
    """(stages - network) / network for a case whose process was already running (no start-up to count)."""
    return ratio_to_network(sum(row["timings_s"].get(stage, 0.0) for stage in STAGES), row)


def standby_overhead_ratio(row):
    """(job wall - network) / network for a job sent to an engine process that was ready."""
    return ratio_to_network(row["job_s"], row)


def standby_table(standby_rows):
    """The panel's case: ready time, the job's wall time and stages, and its overhead ratio."""
    lines = table_head(["Task", "precision (used)", "ready after s", *STAGES, "job s", "overhead ratio",
                        "ratio range", "target met"])
    for row in standby_rows:
        stages = [row["timings_s"].get(stage, 0.0) for stage in STAGES]
        ratio = standby_overhead_ratio(row)
        lines.append(table_row([row["task"], f"{row['asked']} ({row['precision']})", f"{row['ready_s']:.1f}",
                                *(f"{seconds:.1f}" for seconds in stages), f"{row['job_s']:.1f}", f"{ratio:.2f}",
                                ratio_range(row), ratio_verdict(ratio)]))
    return "\n".join(lines)


def import_lines(import_seconds, rows):
    """The imports' wall time against each task's network (auto): the least a fresh process's ratio can be."""
    networks = {row["task"]: row["timings_s"].get("network", 0.0) for row in rows if row["asked"] == "auto"}
    shares = ", ".join(f"{task} {import_seconds / seconds:.2f}" for task, seconds in networks.items() if seconds > 0)
    return [f"- A fresh interpreter importing PyTorch and MONAI as the engine does before its first network, and "
            f"exiting as the command line does: {import_seconds:.1f} s (median of 3). Against each task's network "
            f"(auto): {shares}. A fresh process needs these imports before its first network; it overlaps them with "
            "reading and preparing the input, on the same cores."]


def combined_lines(rows):
    """The abdomen task's time against the slowest single task's and against the three run one after another."""
    lines = []
    for asked in sorted({row["asked"] for row in rows}):
        times = {row["task"]: row["wall_s"] for row in rows if row["asked"] == asked}
        if "abdomen" in times and all(task in times for task in SINGLE_TASKS):
            slowest = max(times[task] for task in SINGLE_TASKS)
            ratio = times["abdomen"] / slowest
            lines.append(f"- abdomen, {asked}: {times['abdomen']:.1f} s, {ratio:.2f} x the slowest single task "
                         f"({slowest:.1f} s; target <= {COMBINED_TARGET}: {'yes' if ratio <= COMBINED_TARGET else '**no**'}),"
                         f" against {sum(times[task] for task in SINGLE_TASKS):.1f} s for the three run one after another")
    return lines


def cpu_name():
    try:
        with open("/proc/cpuinfo") as stream:
            for line in stream:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe_ct(path, built):
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    reader.ReadImageInformation()
    text = (f"a {' x '.join(map(str, reader.GetSize()))} CT at "
            f"{' x '.join(f'{s:.2g}' for s in reader.GetSpacing())} mm ({os.path.basename(path)}")
    if built:
        text += ", real anatomy resampled from TotalSegmentator's example_ct.nii.gz, stretched along the slices"
    return text + ")"


def repeats_of(rows):
    """How many fresh processes each `auto` row is the median of."""
    return max((len(row.get("ratios", [None])) for row in rows if row["asked"] == "auto"), default=1)


def report(rows, ct_description, cores, device, warm_rows=(), import_seconds=None, standby_rows=()):
    import torch

    model = ", ".join(sorted({f"{w} (sha256 {s[:12]})" for row in rows for w, s in zip(row["weights"], row["sha256"])}))
    load = ", ".join(f"{value:.1f}" for value in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    lines = [
        f"Benchmark ({datetime.date.today().isoformat()}): `msdsegment segment` end to end, one fresh process per task, "
        f"on {ct_description}.",
        f"Machine: {cpu_name()}, {len(cores) if cores else os.cpu_count()} CPU cores used, device {device}, "
        f"torch {torch.__version__}, Python {platform.python_version()}; load average at the end {load}. "
        f"Model: {model}.",
        "Stage columns are seconds from the command line's summary JSON; start-up is the rest of the wall time "
        "(interpreter start and imports before the engine's clock). Peak RSS: os.wait4 of the process. Each `auto` "
        f"row is the run with the median overhead ratio of {repeats_of(rows)} fresh processes, with the highest "
        "peak RSS of them; each forced precision runs once.",
        "",
        markdown_table(rows),
        "",
        *combined_lines(rows),
        "",
        "Share of the wall time per stage, and the overhead ratio (wall - network) / network:",
        "",
        share_table(rows),
    ]
    if import_seconds is not None:
        lines += ["", *import_lines(import_seconds, rows)]
    if warm_rows:
        runs = len(warm_rows[0].get("ratios", [None]))
        lines += ["", f"The engine already running: the {runs} cases after the first of {runs + 1} in one "
                  "`--output-dir` process (a batch, a cluster worker, the panel's next volume in one run). The case "
                  "with the median overhead ratio, (stages - network) / network, and the range of the ratio over "
                  f"the {runs}:", "", warm_table(warm_rows)]
    if standby_rows:
        runs = len(standby_rows[0].get("ratios", [None]))
        lines += ["", "The panel's case: its engine process is started ahead of the click (`worker --standby`, when "
                  "the panel is shown and after each run) and has loaded and run its networks. Job s: from the input "
                  "written as the panel writes it (uncompressed NRRD, in a folder removed after the run) to the result "
                  f"reported; overhead ratio (job s - network) / network. Each of {runs} runs has its own engine "
                  "process; the run with the median ratio, and the range:", "", standby_table(standby_rows)]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- main

def parse_arguments(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=list(CT_TASKS),
                        help="CT tasks to measure (space- or comma-separated; default: liver spleen pancreas abdomen)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    parser.add_argument("--cores", type=int, default=2, help="CPU cores the command line may use (default 2)")
    parser.add_argument("--models-dir", help="model cards and weights (default: the bundled models)")
    parser.add_argument("--ct", help="benchmark this CT instead of the built 512 x 512 x 200 one")
    parser.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=["fp32", "auto", "bf16", "fp16"],
                        help="precisions to compare per task (default: fp32 auto)")
    parser.add_argument("--repeats", type=int, default=REPEATS,
                        help=f"runs of each `auto` fresh process and engine-running case, reported as median and "
                        f"range (default {REPEATS})")
    parser.add_argument("--out", default=os.path.join(BENCH, "latest.md"), help="markdown report to write")
    args = parser.parse_args(argv)
    args.tasks = [task for item in args.tasks for task in item.split(",") if task]
    return args


def main(argv=None):
    args = parse_arguments(argv)
    missing = missing_models(args.tasks, args.models_dir or modelcard.MODELS_DIR)
    if missing:
        print(f"bench: error: models missing in {args.models_dir or modelcard.MODELS_DIR}: {'; '.join(missing)}",
              file=sys.stderr)
        return 2
    try:
        ct_path = args.ct or benchmark_ct()
    except example_data.DataError as error:
        print(f"bench: error: {error}", file=sys.stderr)
        return 2
    cores = pick_cores(args.cores)
    print(f"Benchmarking {', '.join(args.tasks)} on {os.path.basename(ct_path)}, {args.device}, "
          f"cores {cores if cores else 'all'}")
    work_dir = tempfile.mkdtemp(prefix="msdsegment-bench-")
    rows = []
    try:
        for task in args.tasks:
            for precision in args.precisions:
                rows.append(measure_fresh(task, ct_path, work_dir, args.device, cores, args.models_dir, precision,
                                          args.repeats))
                print(f"  {task} {precision} ({rows[-1]['precision']}): {rows[-1]['wall_s']:.1f} s, "
                      f"{rows[-1]['peak_rss_bytes'] / 1e9:.2f} GB, overhead ratio {overhead_ratio(rows[-1]):.2f} "
                      f"{ratio_range(rows[-1])}")
        warm_rows, standby_rows = [], []
        if "auto" in args.precisions:
            for task in args.tasks:
                warm_rows.append(measure_warm(task, ct_path, work_dir, args.device, cores, args.models_dir,
                                              repeats=args.repeats))
                print(f"  {task} auto, cases after the first in one process: median ratio "
                      f"{warm_overhead_ratio(warm_rows[-1]):.2f} ({ratio_range(warm_rows[-1])})")
            for task in args.tasks:
                standby_rows.append(measure_standby(task, ct_path, work_dir, args.device, cores, args.models_dir,
                                                    repeats=args.repeats))
                print(f"  {task} auto, engine started ahead: job {standby_rows[-1]['job_s']:.1f} s, median ratio "
                      f"{standby_overhead_ratio(standby_rows[-1]):.2f} ({ratio_range(standby_rows[-1])})")
        import_seconds = measure_imports(cores)
    except RuntimeError as error:
        print(f"bench: error: {error}", file=sys.stderr)
        return 2
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    text = report(rows, describe_ct(ct_path, built=not args.ct), cores, args.device, warm_rows, import_seconds,
                  standby_rows)
    print()
    print(text)
    write_text(text, args.out)
    print(f"Wrote {args.out}")
    missed = [f"{row['task']} {row['asked']}" for row in rows if not within_targets(row)]
    missed += [line for line in combined_lines(rows) if "**no**" in line]
    missed += [f"{row['task']} {row['asked']} overhead ratio {overhead_ratio(row):.2f}" for row in rows
               if row["asked"] == "auto" and overhead_ratio(row) > OVERHEAD_TARGET]
    if missed:
        print(f"Targets missed by: {', '.join(missed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
