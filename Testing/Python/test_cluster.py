"""Cohorts on Ray (`segment --output-dir --cluster`) and DICOM SEG output, on real CT with the shipped spleen model.

The CTs are BTCV volumes cut down to the slices around the spleen (plus 10 mm), so that a case takes seconds.
Every run is the real command line in its own process, with a local Ray on the loopback; each test checks that
no process of it is left behind.
"""

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import REPOSITORY, require, BTCV
from MSDSegmentLib.cluster import CASE_FOLDER_PREFIX, case_folder, case_folder_prefix, remove_orphaned_case_folders
from MSDSegmentLib.errors import MSDSegmentError

pytest.importorskip("ray", reason="the cluster extra is not installed (pip install '.[cluster]')")
pytest.importorskip("highdicom", reason="the cluster extra is not installed (pip install '.[cluster]')")
import highdicom  # noqa: E402
import pydicom  # noqa: E402

CASES = ("btcv_16", "btcv_24", "btcv_28")  # the smallest spleens' neighbourhoods: a few seconds each
SPLEEN_CODE = ("SCT", "78961009", "Spleen")
WORKER_TITLE = "ray::CaseWorker.segment"  # the process title Ray gives a worker while it runs a case


def crop_around_spleen(name, folder, margin_mm=10.0):
    """The BTCV CT `name` cut to the slices holding its labelled spleen plus a margin (real voxels, real grid)."""
    ct = sitk.ReadImage(os.path.join(BTCV, "imagesTr", f"{name}.nii.gz"))
    labels = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(BTCV, "labelsTr", f"{name}.nii.gz")))
    slices = np.where((labels == 1).any(axis=(1, 2)))[0]
    margin = int(round(margin_mm / ct.GetSpacing()[2]))
    first, last = max(0, slices.min() - margin), min(labels.shape[0], slices.max() + margin + 1)
    path = os.path.join(folder, f"{name}.nii.gz")
    sitk.WriteImage(ct[:, :, int(first):int(last)], path)
    return path


def write_dicom_series(image_path, folder, frame_of_reference=True):
    """A CT written as a DICOM CT series (one file per slice), optionally without a Frame of Reference UID,
    as 3D-IRCADb's series are."""
    image = sitk.Cast(sitk.ReadImage(image_path), sitk.sitkInt16)
    os.makedirs(folder)
    root = "1.2.826.0.1.3680043.8.498.77."
    direction = image.GetDirection()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for z in range(image.GetSize()[2]):
        slice_ = image[:, :, z]
        tags = {"0008|0016": "1.2.840.10008.5.1.4.1.1.2", "0008|0018": f"{root}4.{z + 1}", "0020|000d": root + "1",
                "0020|000e": root + "2", "0020|0052": root + "3", "0008|0060": "CT", "0010|0010": "BTCV^Crop",
                "0010|0020": "btcv", "0020|0013": str(z + 1), "0018|0050": f"{image.GetSpacing()[2]:.6f}",
                "0020|0032": "\\".join(f"{v:.6f}" for v in image.TransformIndexToPhysicalPoint((0, 0, z))),
                "0020|0037": "\\".join(f"{v:.6f}" for v in direction[0::3] + direction[1::3]),
                "0028|1052": "0", "0028|1053": "1"}
        for tag, value in tags.items():
            slice_.SetMetaData(tag, value)
        path = os.path.join(folder, f"{z:04d}.dcm")
        writer.SetFileName(path)
        writer.Execute(slice_)
        if not frame_of_reference:
            dataset = pydicom.dcmread(path)
            del dataset.FrameOfReferenceUID
            dataset.save_as(path)
    return folder


def descendants(root):
    """Process ids below `root` (children, their children...), from /proc."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stream:
                    parents[int(entry)] = int(stream.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    found, frontier = set(), {root}
    while frontier:
        frontier = {pid for pid, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def command_line(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as stream:
            return stream.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


LOOPBACK_HEX = {"0100007F", "0000000000000000FFFF00000100007F", "00000000000000000000000001000000"}


def listening_sockets():
    """{socket inode: local address in /proc/net's hex} of every TCP socket listening on this machine."""
    found = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as stream:
                next(stream)
                for line in stream:
                    fields = line.split()
                    if fields[3] == "0A":  # LISTEN
                        found[fields[9]] = fields[1].split(":")[0]
        except OSError:
            continue
    return found


def socket_inodes(pid):
    inodes = set()
    try:
        for descriptor in os.listdir(f"/proc/{pid}/fd"):
            target = os.readlink(f"/proc/{pid}/fd/{descriptor}")
            if target.startswith("socket:["):
                inodes.add(target[len("socket:["):-1])
    except OSError:
        pass
    return inodes


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as stream:
            return stream.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def run_cli(arguments, kill_a_busy_worker=False):
    """The command line in a process of its own: (exit code, stdout, stderr, pids of the workers killed).
    Watches every process it starts (Ray's included): asserts that none listens beyond the loopback and that none
    outlives it. Ray's session files (logs, sockets), which Ray leaves in the temporary folder, go to a folder of
    their own, removed afterwards (a short path: Ray's socket paths must fit in 107 characters)."""
    engine = os.pathsep.join([os.path.join(REPOSITORY, "MSDSegment"), REPOSITORY])
    with tempfile.TemporaryDirectory(prefix="ray-", ignore_cleanup_errors=True) as ray_folder:
        return watched_cli(arguments, kill_a_busy_worker, dict(os.environ, PYTHONPATH=engine, RAY_TMPDIR=ray_folder))


def watched_cli(arguments, kill_a_busy_worker, environment):
    """run_cli's run and checks, in `environment`."""
    process = subprocess.Popen([sys.executable, "-m", "MSDSegmentLib", "segment"] + arguments, env=environment,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen, killed, listening = set(), [], {}

    def watch():
        while process.poll() is None:
            below = descendants(process.pid)
            seen.update(below)
            sockets = listening_sockets()
            for pid in below | {process.pid}:
                listening.update({inode: (pid, sockets[inode]) for inode in socket_inodes(pid) if inode in sockets})
            busy = [pid for pid in below if command_line(pid).startswith(WORKER_TITLE)]
            if kill_a_busy_worker and busy and not killed:
                time.sleep(1.0)  # well inside the case: it takes several seconds
                if alive(busy[0]) and command_line(busy[0]).startswith(WORKER_TITLE):
                    os.kill(busy[0], signal.SIGKILL)
                    killed.append(busy[0])
            time.sleep(0.2)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    out, err = process.communicate(timeout=900)
    watcher.join()
    deadline = time.time() + 20
    while any(alive(pid) for pid in seen) and time.time() < deadline:
        time.sleep(0.5)
    left = [f"{pid}: {command_line(pid)}" for pid in seen if alive(pid)]
    assert not left, f"processes left behind: {left}"
    exposed = [f"{command_line(pid) or pid} on {address}" for pid, address in listening.values()
               if address not in LOOPBACK_HEX]
    assert not exposed, f"listening beyond the loopback: {exposed}"
    return process.returncode, out, err, killed


def test_cluster_forms_and_misuse_are_refused_in_one_line_before_anything_starts(tmp_path, capsys):
    from MSDSegmentLib.cli import main
    from MSDSegmentLib.cluster import parse_cluster

    assert parse_cluster("local:3").workers == 3 and parse_cluster("local:3").address == "local"
    assert parse_cluster("auto", 2).workers == 2 and parse_cluster("ray://head:10001").address == "ray://head:10001"
    for text in ("local:0", "local:x", "ray://", "head:6379", ""):
        with pytest.raises(MSDSegmentError):
            parse_cluster(text)
    ct = str(tmp_path / "ct.nii.gz")
    sitk.WriteImage(sitk.Image([8, 8, 8], sitk.sitkInt16), ct)
    misuses = ((["--output", str(tmp_path / "x.nii.gz"), "--cluster", "local:2"], "go with --output-dir"),
               (["--output-dir", str(tmp_path), "--cluster", "local:0"], "--cluster local:N wants"),
               (["--output-dir", str(tmp_path / "missing"), "--cluster", "local:1"], "Output folder does not exist"))
    for arguments, message in misuses:
        assert main(["segment", "--task", "spleen"] + arguments + [ct]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("msdsegment: error: ") and message in lines[0], lines
    assert sorted(os.listdir(tmp_path)) == ["ct.nii.gz"]


def labels_of(path):
    return sitk.GetArrayFromImage(sitk.ReadImage(path))


def summary_rows(folder):
    with open(os.path.join(folder, "summary.json"), encoding="utf-8") as stream:
        return {os.path.basename(row["input"]): row for row in json.load(stream)["cases"]}


def leftovers(folder):
    """Temporary files of unfinished writes."""
    return [name for name in os.listdir(folder) if name.startswith(".msdsegment-")]


@pytest.fixture(scope="module")
def real_cts(tmp_path_factory):
    require(BTCV)
    folder = str(tmp_path_factory.mktemp("real-ct"))
    return [crop_around_spleen(name, folder) for name in CASES]


@pytest.fixture(scope="module")
def reference(real_cts, tmp_path_factory):
    """The single-process command line's label maps of the real CTs."""
    folder = str(tmp_path_factory.mktemp("single-process"))
    code, _, err, _ = run_cli(["--task", "spleen", "--output-dir", folder, "--quiet"] + real_cts)
    assert code == 0, err
    return {name: labels_of(os.path.join(folder, f"{name}.nii.gz")) for name in CASES}


@pytest.fixture(scope="module")
def bad_input(real_cts, tmp_path_factory):
    """A real CT stored as float with a NaN voxel (which a NIfTI reader would silently make 0)."""
    import nibabel

    image = nibabel.load(real_cts[0])
    voxels = np.asarray(image.dataobj, dtype=np.float32)
    voxels[10, 10, 5] = np.nan
    path = str(tmp_path_factory.mktemp("bad") / "with_nan.nii.gz")
    nibabel.save(nibabel.Nifti1Image(voxels, image.affine), path)
    return path


@pytest.fixture(scope="module")
def dicom_series(real_cts, tmp_path_factory):
    """The third CT as a DICOM series, and again without a Frame of Reference UID."""
    folder = tmp_path_factory.mktemp("dicom")
    return (write_dicom_series(real_cts[2], str(folder / "series")),
            write_dicom_series(real_cts[2], str(folder / "no-frame-of-reference"), frame_of_reference=False))


@pytest.fixture(scope="module")
def cluster_run(real_cts, bad_input, dicom_series, tmp_path_factory):
    """Two local workers on the three CTs and the DICOM series, with a bad input among them."""
    folder = str(tmp_path_factory.mktemp("cluster"))
    inputs = [real_cts[0], bad_input] + real_cts[1:] + [dicom_series[0]]
    code, out, err, _ = run_cli(["--task", "spleen", "--output-dir", folder, "--cluster", "local:2"] + inputs)
    return folder, inputs, code, out, err


def test_two_local_workers_give_the_single_process_outputs_voxel_for_voxel(cluster_run, reference):
    folder, _, _, out, _ = cluster_run
    for name in CASES:
        np.testing.assert_array_equal(labels_of(os.path.join(folder, f"{name}.nii.gz")), reference[name])
        assert reference[name].any(), f"{name}: no spleen found"
    rows = summary_rows(folder)
    assert len({rows[f"{name}.nii.gz"]["worker"] for name in CASES}) == 2  # both workers took cases
    for name in CASES:
        row = rows[f"{name}.nii.gz"]
        assert row["status"] == "done" and row["output"] == f"{name}.nii.gz" and row["seconds"] > 0
        assert row["volumes_ml"]["Spleen"] > 50 and row["quality"]["Spleen"]["check"] in (True, False)
        with open(os.path.join(folder, f"{name}.json"), encoding="utf-8") as stream:
            assert json.load(stream)["output"] == os.path.join(folder, f"{name}.nii.gz")
    with open(os.path.join(folder, "summary.csv"), encoding="utf-8") as stream:
        header, *lines = stream.read().splitlines()
    assert header.startswith("input,case,status,reason,seconds,output") and "Spleen mL" in header
    assert len(lines) == 5
    assert "5/5 cases: 4 done, 1 failed" in out
    assert not leftovers(folder)


def test_a_bad_input_among_good_ones_fails_alone(cluster_run):
    folder, inputs, code, _, err = cluster_run
    assert code == 2
    lines = err.strip().splitlines()
    assert f"msdsegment: error: {inputs[1]}: {inputs[1]} contains NaN or infinite voxels" in "\n".join(lines)
    assert lines[-1] == f"msdsegment: error: 1 of 5 inputs failed: {inputs[1]}"
    row = summary_rows(folder)["with_nan.nii.gz"]
    assert row["status"] == "failed" and "contains NaN or infinite voxels" in row["reason"] and row["output"] == ""
    assert sorted(os.listdir(folder)) == sorted([f"{name}{suffix}" for name in CASES + ("series",)
                                                 for suffix in (".json", ".nii.gz")] + ["summary.csv", "summary.json"])


def test_a_second_run_skips_what_is_done_and_redoes_the_rest(cluster_run, reference, tmp_path):
    folder, inputs, _, _, _ = cluster_run
    outputs = {name: os.path.join(folder, f"{name}.nii.gz") for name in CASES}
    kept = os.stat(outputs[CASES[0]]).st_mtime_ns
    os.remove(outputs[CASES[1]])                     # lost
    with open(outputs[CASES[2]], "r+b") as stream:   # changed since: its sha256 no longer matches the summary
        stream.truncate(100)
    code, out, err, _ = run_cli(["--task", "spleen", "--output-dir", folder, "--cluster", "local:2"] + inputs)
    assert code == 2, err                            # the bad input is tried again, and fails again
    assert "2 of 5 inputs already done with this model (summary.json): skipped" in out
    assert os.stat(outputs[CASES[0]]).st_mtime_ns == kept
    for name in CASES:
        np.testing.assert_array_equal(labels_of(outputs[name]), reference[name])
    # Everything done now: a third run starts no Ray at all and writes nothing.
    stamps = {name: os.stat(path).st_mtime_ns for name, path in outputs.items()}
    code, out, err, _ = run_cli(["--task", "spleen", "--output-dir", folder, "--cluster", "local:2"] + inputs[2:])
    assert code == 0, err
    assert "3 of 3 inputs already done" in out
    assert stamps == {name: os.stat(path).st_mtime_ns for name, path in outputs.items()}
    assert len(summary_rows(folder)) == 5            # the earlier inputs keep their rows


def test_a_worker_killed_mid_case_has_its_cases_redone_elsewhere(real_cts, reference, tmp_path):
    folder = str(tmp_path)
    code, out, err, killed = run_cli(["--task", "spleen", "--output-dir", folder, "--cluster", "local:2", "--quiet"]
                                     + real_cts, kill_a_busy_worker=True)
    assert killed, "no worker was seen running a case"
    assert code == 0, err
    for name in CASES:
        np.testing.assert_array_equal(labels_of(os.path.join(folder, f"{name}.nii.gz")), reference[name])
    rows = summary_rows(folder).values()
    assert all(row["status"] == "done" for row in rows)
    assert any(row["attempts"] > 1 for row in rows)
    # The case it was running is redone by another worker. A case it finished before the kill keeps its row: the
    # worker may end one case and start the next in the second between being seen busy and being killed.
    assert not any(row["worker"].endswith(f":{killed[0]}") for row in rows if row["attempts"] > 1)
    assert not leftovers(folder)
    assert not case_folders_of(killed[0])  # the killed worker's scratch folder was removed after it


def case_folders_of(process):
    return [name for name in os.listdir(tempfile.gettempdir()) if name.startswith(case_folder_prefix(process))]


@pytest.mark.skipif(os.name != "posix", reason="orphaned case folders are told by signal 0, on POSIX systems")
def test_only_the_case_folders_of_dead_workers_are_removed():
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()  # its process id is free now: the folder of a worker killed mid-case
    orphan = tempfile.mkdtemp(prefix=case_folder_prefix(ended.pid))
    with open(os.path.join(orphan, "case.nii.gz"), "wb") as stream:
        stream.write(b"the half-written output of the case it was running")
    own = case_folder()
    elsewhere = tempfile.mkdtemp(prefix=f"{CASE_FOLDER_PREFIX}another-machine-{ended.pid}-")  # a shared /tmp
    try:
        remove_orphaned_case_folders()
        assert not os.path.exists(orphan)
        assert os.path.isdir(own) and case_folders_of(os.getpid()) == [os.path.basename(own)]
        assert os.path.isdir(elsewhere)
    finally:
        os.rmdir(own)
        os.rmdir(elsewhere)


def test_dicom_seg_from_a_dicom_series_round_trips_with_the_cards_codes(real_cts, dicom_series, cluster_run, tmp_path):
    complete, without_frame = dicom_series
    seg_dir = tmp_path / "seg"
    seg_dir.mkdir()
    code, _, err, _ = run_cli(["--task", "spleen", "--output-dir", str(seg_dir), "--cluster", "local:1",
                               "--format", "dicom-seg", "--quiet", complete, without_frame, real_cts[0]])
    assert code == 2
    assert f"msdsegment: error: {without_frame}: Cannot write a DICOM SEG for {without_frame}: its images lack " \
           "Frame of Reference UID (0020,0052), which the Segmentation IOD requires" in err
    assert f"msdsegment: error: {real_cts[0]}: DICOM SEG output needs a DICOM series folder as input" in err
    assert sorted(os.listdir(seg_dir)) == ["series.dcm", "series.json", "summary.csv", "summary.json"]

    labels = sitk.ReadImage(os.path.join(cluster_run[0], "series.nii.gz"))  # the series' label map
    expected = sitk.GetArrayFromImage(labels)
    assert expected.any()

    segmentation = highdicom.seg.segread(str(seg_dir / "series.dcm"))
    sources = [pydicom.dcmread(os.path.join(complete, name), stop_before_pixels=True)
               for name in sorted(os.listdir(complete))]
    assert segmentation.SeriesInstanceUID != sources[0].SeriesInstanceUID
    assert segmentation.FrameOfReferenceUID == sources[0].FrameOfReferenceUID
    assert segmentation.StudyInstanceUID == sources[0].StudyInstanceUID
    referenced = {item.ReferencedSOPInstanceUID for series in segmentation.ReferencedSeriesSequence
                  for item in series.ReferencedInstanceSequence}
    assert referenced == {source.SOPInstanceUID for source in sources}
    frames = segmentation.get_pixels_by_source_instance([source.SOPInstanceUID for source in sources],
                                                        combine_segments=True, skip_overlap_checks=True)
    for source, frame in zip(sources, frames):
        index = labels.TransformPhysicalPointToIndex([float(v) for v in source.ImagePositionPatient])
        np.testing.assert_array_equal(frame, expected[index[2]])
    description = segmentation.get_segment_description(1)
    assert segmentation.number_of_segments == 1 and description.segment_label == "Spleen"
    prop = description.segmented_property_type
    assert (prop.scheme_designator, prop.value, prop.meaning) == SPLEEN_CODE
    assert description.segmented_property_category.value == "123037004"
    colour = highdicom.color.CIELabColor.from_dicom_value(description.RecommendedDisplayCIELabValue).to_rgb()
    np.testing.assert_allclose(colour, (157, 108, 162), atol=1)  # the card's spleen colour

    # dcmqi, the reader of Slicer's QuantitativeReporting, reads the same segment, codes, colour and voxels.
    converted = tmp_path / "dcmqi"
    converted.mkdir()
    tool = os.path.join(os.path.dirname(sys.executable), "segimage2itkimage")
    subprocess.run([tool, "--inputDICOM", str(seg_dir / "series.dcm"), "--outputDirectory", str(converted),
                    "--outputType", "nii"], check=True, capture_output=True, timeout=300)
    with open(converted / "meta.json", encoding="utf-8") as stream:
        attributes = json.load(stream)["segmentAttributes"][0][0]
    assert attributes["SegmentLabel"] == "Spleen" and attributes["recommendedDisplayRGBValue"] == [157, 108, 162]
    assert attributes["SegmentedPropertyTypeCodeSequence"]["CodeValue"] == SPLEEN_CODE[1]
    read_by_dcmqi = sitk.Resample(sitk.ReadImage(str(converted / "1.nii.gz")), labels, sitk.Transform(),
                                  sitk.sitkNearestNeighbor, 0)  # dcmqi keeps only the slices with the segment
    np.testing.assert_array_equal(sitk.GetArrayFromImage(read_by_dcmqi) > 0, expected == 1)


def test_format_names_the_output_dir_files_and_dicom_seg_refuses_a_file_input(tmp_path, tiny_models_dir, capsys):
    """Without --cluster: --format picks --output-dir's file type; a DICOM SEG of a NIfTI is refused in one line."""
    from images import synthetic_ct
    from MSDSegmentLib.cli import main

    ct = str(tmp_path / "case.nii.gz")
    sitk.WriteImage(synthetic_ct(), ct)
    for name, format_ in (("nrrd", "seg.nrrd"), ("seg", "dicom-seg")):
        folder = tmp_path / name
        folder.mkdir()
        code = main(["segment", "--task", "spleen", "--models-dir", tiny_models_dir, "--output-dir", str(folder),
                     "--format", format_, "--quiet", ct])
        err = capsys.readouterr().err
        if format_ == "seg.nrrd":
            assert code == 0, err
            assert sorted(os.listdir(folder)) == ["case.json", "case.seg.nrrd"]
            assert sitk.ReadImage(str(folder / "case.seg.nrrd")).GetMetaData("Segment0_Name") == "Spleen"
        else:
            assert code == 2
            assert err.splitlines()[0] == (f"msdsegment: error: {ct}: DICOM SEG output needs a DICOM series folder "
                                           f"as input, which it references: {ct} is not one (write .nii.gz, .nrrd, "
                                           ".seg.nrrd or .mha instead)")
            assert os.listdir(folder) == []
