"""Many cases on Ray: `msdsegment segment --output-dir OUT --cluster local:N | auto | ray://HOST:PORT INPUT...`.

Ray (an optional extra, `pip install "msdsegment[cluster]"`, imported only here and only when asked) runs a pool of
workers (actors), each of which loads the task's networks once and keeps them, on a GPU of its own where the cluster
has GPUs. The inputs stream to the workers, at most two cases queued on each, so a long run holds little in memory.

A worker reads its input by path (on a cluster: a file system every node shares) and segments it with the very code
of the single-process command line, into a scratch folder of its own; the driver receives the files and writes them
into OUT atomically the moment the case finishes, with OUT/summary.csv and OUT/summary.json (one row per input).

Faults: a worker that dies mid-case (killed, out of memory, a lost node) is replaced, and its cases go back to the
queue for any worker; a case that has killed three workers fails alone, as does an input that cannot be segmented.
Resume: a second run skips each input whose summary row is done with the same model (the cards' sha256) and
settings and whose output file still has the sha256 recorded in that row.

Locally, Ray talks only over the loopback (127.0.0.1), without a dashboard or usage statistics.
"""

import argparse
import csv
import glob
import io
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
from collections import deque
from dataclasses import dataclass, field

from . import modelcard
from .errors import InputError, MSDSegmentError
from .atomic import atomic_output, write_json

PROG = "msdsegment"
LOOPBACK = "127.0.0.1"
LOCAL_OBJECT_STORE_BYTES = 512 * 2**20  # label maps and summaries only: the inputs are read by the workers
CASES_QUEUED_PER_WORKER = 2             # one running, one waiting: a worker never idles between cases
MAX_ATTEMPTS = 3                        # a case whose worker died this often may be what kills them
CPUS_PER_CPU_WORKER = 4                 # on a running cluster without GPUs, when --workers is not given
SUMMARY_JSON, SUMMARY_CSV = "summary.json", "summary.csv"
CASE_FOLDER_PREFIX = "msdsegment-case-"  # then the machine's name, the worker's process id and "-"


@dataclass
class ClusterSpec:
    """Where to run: a new local Ray with `workers` workers, or a running cluster at `address`."""
    address: str                   # "local", "auto" or "ray://HOST:PORT"
    workers: int = None


def parse_cluster(text, workers=None):
    """--cluster's value: local:N, auto or ray://HOST:PORT."""
    text = (text or "").strip()
    if text.startswith("local:"):
        count = text[len("local:"):]
        if not count.isdigit() or int(count) < 1:
            raise InputError(f"--cluster local:N wants a number of workers of at least 1, got '{text}'")
        return ClusterSpec("local", int(count))
    if text == "auto" or (text.startswith("ray://") and len(text) > len("ray://")):
        if workers is not None and workers < 1:
            raise InputError(f"--workers wants at least 1, got {workers}")
        return ClusterSpec(text, workers)
    raise InputError(f"--cluster wants local:N, auto or ray://HOST:PORT, got '{text}'")


def import_ray(local):
    """Ray, with usage statistics off; for a local cluster every Ray process binds to the loopback only (Ray
    reads these variables when it is imported, and its processes inherit them)."""
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    if local:
        # Single-machine mode: Ray takes 127.0.0.1 as the node's address instead of the machine's network one.
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    try:
        import ray
    except ImportError:
        raise MSDSegmentError('--cluster needs Ray: pip install "msdsegment[cluster]"') from None
    return ray


def local_cpus():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def start_ray(spec):
    """Start or join the cluster; the Ray module."""
    ray = import_ray(spec.address == "local")
    options = dict(log_to_driver=False, logging_level=logging.ERROR)
    if spec.address == "local":
        ray.init(address="local", num_cpus=max(local_cpus(), spec.workers), include_dashboard=False,
                 _node_ip_address=LOOPBACK, object_store_memory=LOCAL_OBJECT_STORE_BYTES, **options)
    else:
        try:
            ray.init(address=spec.address, **options)
        except (ConnectionError, RuntimeError, ValueError) as error:
            raise MSDSegmentError(f"Cannot join the Ray cluster at {spec.address}: {' '.join(str(error).split())}")
    return ray


def worker_resources(ray, spec, device):
    """(workers, CPUs each, GPUs each) from what the cluster has: a GPU per worker where it has GPUs."""
    resources = ray.cluster_resources()
    cpus, gpus = resources.get("CPU", 1.0), (0.0 if device == "cpu" else resources.get("GPU", 0.0))
    workers = spec.workers or (int(gpus) if gpus >= 1 else max(1, int(cpus) // CPUS_PER_CPU_WORKER))
    per_gpu = min(1.0, gpus / workers) if gpus else 0.0
    return workers, max(1, int(cpus) // workers), per_gpu


def machine_case_folder_prefix():
    """The start of the names of this machine's case folders: machines (or containers) that share a temporary folder
    can then tell their own processes' folders."""
    return f"{CASE_FOLDER_PREFIX}{platform.node()}-"


def case_folder_prefix(process=None):
    """The start of the names of the case folders of a process of this machine (this one by default)."""
    return f"{machine_case_folder_prefix()}{process or os.getpid()}-"


def case_folder():
    """A scratch folder for one case, named after this process (remove_orphaned_case_folders)."""
    return tempfile.mkdtemp(prefix=case_folder_prefix())


def process_exists(process):
    try:
        os.kill(process, 0)  # signal 0: only asks whether the process is there
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        return True
    return True


def remove_orphaned_case_folders():
    """Remove this machine's case folders whose worker process is gone: a worker killed mid-case (out of memory, a
    kill by hand) leaves its folder behind, with what it had written of the output. Only on POSIX systems, where
    signal 0 asks after a process (on Windows, os.kill ends it)."""
    if os.name != "posix":
        return
    machine = machine_case_folder_prefix()
    for folder in glob.glob(os.path.join(tempfile.gettempdir(), glob.escape(machine) + "*-*")):
        process = os.path.basename(folder)[len(machine):].split("-")[0]
        if process.isdigit() and not process_exists(int(process)):
            shutil.rmtree(folder, ignore_errors=True)


class CaseWorker:
    """A Ray actor: loads the task's networks once, then segments one case per call with `segment_case` (the
    command line's own function, so the output is exactly the single-process one)."""

    def __init__(self, settings, segment_case, cpus):
        import torch

        from .engine import network_for, pick_device

        torch.set_num_threads(cpus)
        remove_orphaned_case_folders()  # of workers that died on this machine before
        self.settings, self.segment_case = settings, segment_case
        card = modelcard.find_card(settings["task"], settings["models_dir"] or modelcard.MODELS_DIR)
        device = pick_device(settings["device"])
        for stage in card.stages:
            network_for(stage, device)

    def segment(self, inputs, name, suffix):
        """{"status", "reason", "seconds", "output" (the file's bytes), "summary", "worker", "peak_rss_mb"}."""
        started = time.perf_counter()
        row = {"worker": f"{platform.node()}:{os.getpid()}"}
        folder = case_folder()
        try:
            output = os.path.join(folder, name + suffix)
            args = argparse.Namespace(**self.settings, quiet=True, progress_lines=False)
            self.segment_case(inputs, output, args, lambda text: None)
            with open(output, "rb") as stream:
                row["output"] = stream.read()
            with open(os.path.join(folder, name + ".json"), encoding="utf-8") as stream:
                row["summary"] = json.load(stream)
            row["status"] = "done"
        except MSDSegmentError as error:
            row.update(status="failed", reason=" ".join(str(error).split()))
        except MemoryError:
            row.update(status="failed", reason="out of memory")
        except Exception as error:  # an input the engine did not foresee fails alone, with its reason
            row.update(status="failed", reason=" ".join(f"{type(error).__name__}: {error}".split())[:400])
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        row["seconds"] = round(time.perf_counter() - started, 3)
        row["peak_rss_mb"] = peak_rss_mb()
        return row


def peak_rss_mb():
    """This process's peak resident memory so far (Linux: ru_maxrss in kB); None where it is not known."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


@dataclass
class Case:
    path: str                      # as given on the command line
    output: str
    name: str                      # the output's name without its suffix
    attempts: int = 0


@dataclass
class Summary:
    """OUT/summary.json and summary.csv: one row per input, rewritten atomically after every case."""
    folder: str
    header: dict
    rows: dict = field(default_factory=dict)  # input path -> row

    def earlier_rows(self):
        """The rows of a previous run in this folder, by input path."""
        try:
            with open(os.path.join(self.folder, SUMMARY_JSON), encoding="utf-8") as stream:
                return {row["input"]: row for row in json.load(stream).get("cases", [])}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return {}

    def save(self, order):
        rows = [self.rows[path] for path in order if path in self.rows]
        write_json(dict(self.header, cases=rows), os.path.join(self.folder, SUMMARY_JSON))
        labels = sorted({name for row in rows for name in row.get("volumes_ml", {})})
        columns = ["input", "case", "status", "reason", "seconds", "output", "attempts", "worker"]
        table = io.StringIO()
        writer = csv.writer(table)
        writer.writerow(columns + [f"{name} mL" for name in labels] + [f"{name} check" for name in labels]
                        + ["model sha256"])
        for row in rows:
            quality = row.get("quality", {})
            writer.writerow([row.get(column, "") for column in columns]
                            + [row.get("volumes_ml", {}).get(name, "") for name in labels]
                            + ["; ".join(quality[name]["reasons"]) or "ok" if name in quality else ""
                               for name in labels]
                            + [" ".join(row.get("model_sha256", []))])
        with atomic_output(os.path.join(self.folder, SUMMARY_CSV), ".csv") as temporary:
            with open(temporary, "w", encoding="utf-8", newline="") as stream:
                stream.write(table.getvalue())


def file_sha256(path):
    return modelcard.sha256_of(path) if os.path.isfile(path) else None


def is_done(row, header, output):
    """Whether an earlier run's row stands: done with the same model and settings, its output unchanged."""
    return (row is not None and row.get("status") == "done" and row.get("model_sha256") == header["model"]["sha256"]
            and row.get("settings") == header["settings"] and row.get("output") == os.path.basename(output)
            and row.get("output_sha256") is not None and row.get("output_sha256") == file_sha256(output))


class Progress:
    """Cases done, failed and the time left: a bar on a terminal, a line per case otherwise, or
    `PROGRESS <fraction> <text>` lines (--progress-lines)."""

    def __init__(self, total, quiet, lines, say):
        self.total, self.lines, self.say, self.quiet = total, lines, say, quiet
        self.done = self.failed = 0
        self.started = time.perf_counter()
        self.bar = None
        if total and not quiet and not lines and sys.stderr.isatty():
            try:
                from tqdm import tqdm
            except ImportError:
                return
            self.bar = tqdm(total=total, unit="case", desc="Segmenting", dynamic_ncols=True)

    def text(self):
        finished = self.done + self.failed
        left = (time.perf_counter() - self.started) / finished * (self.total - finished) if finished else None
        time_left = f", about {left / 60:.1f} min left" if left is not None and finished < self.total else ""
        return f"{finished}/{self.total} cases: {self.done} done, {self.failed} failed{time_left}"

    def update(self, row):
        if row["status"] == "done":
            self.done += 1
        else:
            self.failed += 1
        if self.bar is not None:
            self.bar.set_postfix_str(f"failed {self.failed}", refresh=False)
            self.bar.update(1)
        elif self.lines:
            print(f"PROGRESS {(self.done + self.failed) / self.total:.3f} {self.text()}", flush=True)
        elif not self.quiet:
            volumes = ", ".join(f"{name} {ml:.1f} mL" for name, ml in row.get("volumes_ml", {}).items())
            self.say(f"{row['case']}: {row['status']} in {row['seconds']:.1f} s ({volumes or row.get('reason')})"
                     f" - {self.text()}")

    def close(self):
        if self.bar is not None:
            self.bar.close()


class Pool:
    """The workers, each with the cases queued on it; a dead worker is replaced while the budget lasts."""

    def __init__(self, ray, new_actor, count, replacements):
        self.ray, self.new_actor, self.replacements = ray, new_actor, replacements
        self.actors = [new_actor() for _ in range(count)]
        self.queued = {}  # the call's object reference -> (case, actor)
        self.last_death = ""

    def submit(self, pending, suffix):
        for actor in self.actors:
            while pending and sum(1 for _, a in self.queued.values() if a is actor) < CASES_QUEUED_PER_WORKER:
                case = pending.popleft()
                case.attempts += 1
                inputs = [os.path.abspath(case.path)]  # a worker's folder is not the command's
                self.queued[actor.segment.remote(inputs, case.name, suffix)] = (case, actor)

    def next_result(self):
        """(case, the worker's row, or None when the worker died)."""
        ready, _ = self.ray.wait(list(self.queued), num_returns=1)
        case, actor = self.queued.pop(ready[0])
        try:
            return case, self.ray.get(ready[0])
        except self.ray.exceptions.RayError as error:  # the worker died: killed, out of memory, its node lost
            self.last_death = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
            self.replace(actor)
            return case, None

    def replace(self, actor):
        if actor not in self.actors:  # already replaced (a second case queued on it)
            return
        self.actors.remove(actor)
        self.ray.kill(actor, no_restart=True)
        if self.replacements > 0:
            self.replacements -= 1
            self.actors.append(self.new_actor())

    def close(self):
        for actor in self.actors:
            self.ray.kill(actor, no_restart=True)


def settings_of(args):
    """What a case's output depends on besides the model (a resumed row must have been made with the same)."""
    return {"task": args.task, "device": args.device, "precision": args.precision, "tta": bool(args.tta),
            "no_largest": bool(args.no_largest), "models_dir": args.models_dir, "format": args.format or "nii.gz"}


def summary_header(args, card):
    return {"task": args.task, "settings": settings_of(args),
            "model": {"card": os.path.basename(card.path), "weights": [stage.weights for stage in card.stages],
                      "sha256": [stage.sha256 for stage in card.stages]}}


def result_row(case, worker_row, header):
    """The summary row of a finished case."""
    row = {"input": os.path.abspath(case.path), "case": case.name, "status": worker_row["status"],
           "reason": worker_row.get("reason", ""), "seconds": worker_row["seconds"], "output": "",
           "attempts": case.attempts, "worker": worker_row["worker"], "peak_rss_mb": worker_row["peak_rss_mb"]}
    if worker_row["status"] == "done":
        summary = worker_row["summary"]
        row.update(output=os.path.basename(case.output), output_sha256=None, model_sha256=header["model"]["sha256"],
                   settings=header["settings"], volumes_ml=summary["volumes_ml"], quality=summary["quality"],
                   device=summary["device"], precision=summary["precision"], warnings=summary["warnings"])
    return row


def write_case(output, suffix, worker_row):
    """The label map (or DICOM SEG) and its JSON, each atomically; the output's sha256."""
    summary = dict(worker_row["summary"], output=os.path.abspath(output))
    write_json(summary, output[: -len(suffix)] + ".json")
    with atomic_output(output, suffix) as temporary:
        with open(temporary, "wb") as stream:
            stream.write(worker_row["output"])
    return modelcard.sha256_of(output)


def check_run(args, outputs, card):
    """Refuse, before starting anything, what cannot run."""
    if not os.path.isdir(args.output_dir):
        raise MSDSegmentError(f"Output folder does not exist: {args.output_dir}")
    seen = {}
    for path, output in zip(args.inputs, outputs):
        if output in seen:
            raise InputError(f"{seen[output]} and {path} would both write {output}: give inputs distinct names")
        seen[output] = path
    missing = modelcard.missing_weights(card)
    if missing:
        raise MSDSegmentError(f"Model weights missing: {', '.join(missing)}")
    if (args.format or "") == "dicom-seg":
        from .dicomseg import import_highdicom

        import_highdicom()


def cases_to_run(summary, args, outputs, suffix, say):
    """The cases an earlier run in OUT has not done already (their rows are kept)."""
    earlier = summary.earlier_rows()
    summary.rows.update(earlier)  # inputs of earlier runs that this one does not list keep their rows
    pending = deque()
    for path, output in zip(args.inputs, outputs):
        row = earlier.get(os.path.abspath(path))
        if is_done(row, summary.header, output):
            summary.rows[os.path.abspath(path)] = row
        else:
            pending.append(Case(path, output, os.path.basename(output)[: -len(suffix)]))
    if len(pending) < len(outputs):
        say(f"{len(outputs) - len(pending)} of {len(outputs)} inputs already done with this model "
            f"({SUMMARY_JSON}): skipped")
    return pending


def failure(reason):
    """A worker's row for a case no worker could finish."""
    return {"status": "failed", "reason": reason, "seconds": 0.0, "worker": "", "peak_rss_mb": None}


def next_finished(pool, pending, suffix):
    """(case, its worker's row) of the next case to finish, or None when its worker died and it went back to the
    queue; a case fails when its workers died MAX_ATTEMPTS times, or when no worker is left."""
    if pending and not pool.actors:
        return pending.popleft(), failure(f"no worker left: {pool.last_death}")
    pool.submit(pending, suffix)
    case, worker_row = pool.next_result()
    if worker_row is None and case.attempts < MAX_ATTEMPTS:
        pending.appendleft(case)  # for whichever worker is free first
        return None
    return case, worker_row or failure(f"its worker died {case.attempts} times (killed, or out of memory): "
                                       f"{pool.last_death}")


def run_cases(ray, spec, args, pending, suffix, segment_case, summary, order, say):
    """Segment the pending cases on the started Ray, recording each as it finishes; the inputs that failed."""
    workers, cpus, gpus = worker_resources(ray, spec, args.device)
    actor = ray.remote(CaseWorker).options(num_cpus=cpus, num_gpus=gpus, max_restarts=0, max_task_retries=0)
    settings = {key: getattr(args, key) for key in ("task", "device", "precision", "tta", "no_largest", "models_dir")}
    pool = Pool(ray, lambda: actor.remote(settings, segment_case, cpus), workers, workers * MAX_ATTEMPTS)
    progress = Progress(len(pending), args.quiet, args.progress_lines, say)
    failed = []
    try:
        while pending or pool.queued:
            finished = next_finished(pool, pending, suffix)
            if finished is None:
                continue
            case, worker_row = finished
            row = result_row(case, worker_row, summary.header)
            if row["status"] == "done":
                row["output_sha256"] = write_case(case.output, suffix, worker_row)
            else:
                failed.append(case.path)
                print(f"{PROG}: error: {case.path}: {row['reason']}", file=sys.stderr, flush=True)
            summary.rows[row["input"]] = row
            summary.save(order)
            progress.update(row)
    finally:
        progress.close()
        pool.close()
    return failed


def segment_on_ray(args, outputs, suffix, segment_case, say):
    """Segment args.inputs into `outputs` (one per input) on Ray; the exit status (2 when any failed)."""
    spec = parse_cluster(args.cluster, args.workers)
    card = modelcard.find_card(args.task, args.models_dir or modelcard.MODELS_DIR)
    check_run(args, outputs, card)
    summary = Summary(args.output_dir, summary_header(args, card))
    pending = cases_to_run(summary, args, outputs, suffix, say)
    given = [os.path.abspath(path) for path in args.inputs]
    order = given + [path for path in summary.rows if path not in given]
    summary.save(order)
    failed = []
    if pending:
        ray = start_ray(spec)
        try:
            failed = run_cases(ray, spec, args, pending, suffix, segment_case, summary, order, say)
        finally:
            ray.shutdown()
            if spec.address == "local":  # its workers ran on this machine
                remove_orphaned_case_folders()
    if failed:
        print(f"{PROG}: error: {len(failed)} of {len(args.inputs)} inputs failed: {', '.join(failed)}",
              file=sys.stderr)
        return 2
    return 0
