"""Train on a lent GPU machine that has PyTorch but neither SimpleITK nor MONAI, and that takes and gives back only a
few tens of MB a call (the project's device tool: 64 MiB in, 8 files of 16 MiB out).

  pack MODEL_FOLDER FILE       a built plan and cache (train --steps 0) -> one xz file. A CT's image travels in
                               7-bit steps of its intensity window (3.1 HU for BTCV's 400 HU), its label exactly; the
                               oversampling locations are drawn again by unpack, with the cache's generator, in the
                               order of the case ids.
  unpack FILE MODEL_FOLDER     the other way, on the GPU machine.
  pair --budget S MODEL:OUT... -- TRAIN FLAGS
                               runs side by side, each ending its full learning-rate schedule by the budget: a short
                               calibration run of all of them together measures the seconds a step, then the real
                               runs get as many steps as fit.
  collect RUN_FOLDER NAME DEST the run's best weights (and last, with --last) in fp16 (what export keeps), cut into
                               pieces that fit what comes back; join them with cat.

Where SimpleITK is missing (only building a cache needs it) a stand-in module lets the training import. The
experiment's recipe and figures are in docs/models.md.
"""

import argparse
import atexit
import csv
import io
import json
import lzma
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def import_path():
    """PYTHONPATH for this process and the training runs: the repository, the module, and a stand-in SimpleITK
    where there is none."""
    try:
        import SimpleITK  # noqa: F401
        extra = []
    except ImportError:
        stand_in = tempfile.mkdtemp(prefix="stand-in-")
        atexit.register(shutil.rmtree, stand_in, True)  # after the training runs, which import it too
        with open(os.path.join(stand_in, "SimpleITK.py"), "w") as stream:
            stream.write("def __getattr__(name):\n    return None\n")
        extra = [stand_in]
    return extra + [REPOSITORY, os.path.join(REPOSITORY, "MSDSegment")]


IMPORT_PATH = import_path()
sys.path[:0] = IMPORT_PATH
from Training.cache import foreground_locations, label_count, save_case  # noqa: E402
from Training.export import save_weights  # noqa: E402
from Training.plan import load_plan, save_json  # noqa: E402

LEVELS = 127


def intensity_scale(plan):
    normalisation = plan["normalisation"]
    if "window" not in normalisation:
        sys.exit(f"only a CT plan (an intensity window) packs in 7 bits, not {normalisation['type']}")
    low, high = normalisation["window"]
    return low, high, normalisation["mean"], normalisation["std"]


def pack(folder, target):
    plan = load_plan(os.path.join(folder, "plan.json"))
    low, high, mean, std = intensity_scale(plan)
    cache = os.path.join(folder, "cache")
    ids = sorted(name[:-4] for name in os.listdir(cache) if name.endswith(".npz"))
    arrays = {}
    for case in ids:
        with np.load(os.path.join(cache, case + ".npz")) as data:
            if data["image"].shape[0] != 1:
                sys.exit(f"{case}: only one channel packs")
            intensity = np.clip(data["image"][0].astype(np.float32) * std + mean, low, high)
            arrays[case + "/image"] = np.round((intensity - low) / (high - low) * LEVELS).astype(np.uint8)
            arrays[case + "/label"] = data["label"]
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    with lzma.open(target, "wb", preset=9 | lzma.PRESET_EXTREME) as out:
        out.write(json.dumps({"plan": plan, "ids": ids}).encode() + b"\n" + buffer.getvalue())


def unpack(source, folder):
    with lzma.open(source) as stream:
        header = json.loads(stream.readline())
        data = np.load(io.BytesIO(stream.read()))
    plan = header["plan"]
    low, high, mean, std = intensity_scale(plan)
    os.makedirs(os.path.join(folder, "cache"), exist_ok=True)
    save_json(plan, os.path.join(folder, "plan.json"))  # atomically, as train writes it: a resumed run trusts it
    rng = np.random.default_rng(0)  # as build_cache draws them
    for case in header["ids"]:
        intensity = data[case + "/image"].astype(np.float32) / LEVELS * (high - low) + low
        label = data[case + "/label"]
        locations = foreground_locations(label, label_count(plan), rng)
        image = ((intensity - mean) / std).astype(np.float16)[None]
        save_case(os.path.join(folder, "cache", case + ".npz"), image, label, locations)


def launch(model, out, flags, log_path, runs):
    # The runs share the cores: each with all of them as its threads, two on 2 cores stalled for seconds at a time.
    threads = str(max(1, (os.cpu_count() or 1) // runs))
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join(IMPORT_PATH), "PYTHONUNBUFFERED": "1",
                   "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    with open(log_path, "w") as log:
        return subprocess.Popen([sys.executable, "-m", "Training", "train", "--model", model, "--out", out, *flags],
                                stdout=log, stderr=subprocess.STDOUT, env=environment)


def seconds_a_step(run_dir, first, last):
    with open(os.path.join(run_dir, "train_log.csv")) as stream:
        seconds = {int(row["step"]): float(row["seconds"]) for row in csv.DictReader(stream)}
    start = min(step for step in seconds if step >= first)
    return (seconds[last] - seconds[start]) / (last - start)


def calibrate(runs, flags, steps, logs):
    """Every run for `steps` steps at once, in a folder of its own that links the real one's plan and cache."""
    processes = {}
    for model, out in runs:
        folder = os.path.join(out + "-calibration", model)
        os.makedirs(folder, exist_ok=True)
        for name in ("plan.json", "cache"):
            link = os.path.join(folder, name)
            if not os.path.lexists(link):
                os.symlink(os.path.abspath(os.path.join(out, model, name)), link)
        processes[model] = launch(model, out + "-calibration", flags + ["--steps", "100000", "--stop-at", str(steps)],
                                  os.path.join(logs, f"{model}-calibration.log"), len(runs))
    if any(process.wait() for process in processes.values()):
        sys.exit(f"a calibration run failed: see {logs}")
    return {model: seconds_a_step(os.path.join(out + "-calibration", model, "fold0"), steps // 3, steps)
            for model, out in runs}


def pair(arguments):
    started = time.time()
    runs = [tuple(item.split(":", 1)) for item in arguments.runs]
    os.makedirs(arguments.logs, exist_ok=True)
    pace = calibrate(runs, arguments.train_flags, arguments.calibration_steps, arguments.logs)
    left = arguments.budget - (time.time() - started) - arguments.reserve
    processes = {}
    for model, out in runs:
        # 7 % under the calibrated pace (validations, a slower patch of steps); validated 8 times on the way.
        steps = max(10, int(left / pace[model] * 0.93) // 10 * 10)
        print(f"{model}: {pace[model]:.3f} s a step side by side, {steps} steps", flush=True)
        flags = arguments.train_flags + ["--steps", str(steps), "--val-every", str(max(10, steps // 80 * 10))]
        processes[model] = launch(model, out, flags, os.path.join(arguments.logs, f"{model}.log"), len(runs))
    while any(process.poll() is None for process in processes.values()):
        time.sleep(2)
        if time.time() - started > arguments.budget + arguments.reserve / 2:
            print("past the budget: stopping the runs", flush=True)
            for process in processes.values():
                process.terminate()
            break
    for model, process in processes.items():
        print(f"{model}: exit {process.wait()}", flush=True)


def collect(run_dir, name, destination, last=False, piece_bytes=11_500_000):
    os.makedirs(destination, exist_ok=True)
    sources = [("best", "best_model.pt")] + ([("last", "last.ckpt")] if last else [])
    for kind, source in sources:
        with tempfile.TemporaryDirectory() as folder:
            whole = os.path.join(folder, "weights.pt")
            save_weights(os.path.join(run_dir, source), whole)  # fp16, as export keeps them
            with open(whole, "rb") as stream:
                data = stream.read()
        for index, offset in enumerate(range(0, len(data), piece_bytes)):
            with open(os.path.join(destination, f"{name}_{kind}.pt.{index:02d}"), "wb") as stream:
                stream.write(data[offset:offset + piece_bytes])


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    train_flags = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    for name in ("pack", "unpack"):
        command = commands.add_parser(name)
        command.add_argument("source")
        command.add_argument("target")
    paired = commands.add_parser("pair")
    paired.add_argument("runs", nargs="+", metavar="MODEL:OUT")
    paired.add_argument("--budget", type=float, required=True, help="seconds until every run has ended")
    paired.add_argument("--reserve", type=float, default=45, help="seconds kept for start-up, validation and saving")
    paired.add_argument("--calibration-steps", type=int, default=150)
    paired.add_argument("--logs", default="runs/logs")
    collected = commands.add_parser("collect")
    collected.add_argument("run_dir")
    collected.add_argument("name")
    collected.add_argument("destination")
    collected.add_argument("--last", action="store_true", help="the last step's weights too")
    arguments = parser.parse_args(argv)
    if arguments.command == "pair" and (arguments.calibration_steps < 20 or arguments.calibration_steps % 10):
        parser.error("--calibration-steps: a multiple of 10 from 20 (train logs its time every 10 steps)")
    if arguments.command == "pack":
        pack(arguments.source, arguments.target)
    elif arguments.command == "unpack":
        unpack(arguments.source, arguments.target)
    elif arguments.command == "pair":
        arguments.train_flags = train_flags
        pair(arguments)
    else:
        collect(arguments.run_dir, arguments.name, arguments.destination, arguments.last)


if __name__ == "__main__":
    main()
