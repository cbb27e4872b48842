"""Real example CTs for the demo and the benchmark, from the TotalSegmentator 2.18.0 source distribution on PyPI.

Its `tests/reference_files/` (Apache-2.0) hold real CT with TotalSegmentator's own segmentation beside it:
  example_ct_sm.nii.gz  upper abdomen, 3 mm, with liver, spleen and part of the pancreas
  example_seg.nii.gz    TotalSegmentator's segmentation of it (v2 classes: 1 spleen, 5 liver, 7 pancreas)
  example_ct.nii.gz     abdomen and pelvis, 3 mm
  example_mr_sm.nii.gz  abdominal MR, 3 mm (the tests give it to a CT task, which must flag every segment)
The archive is downloaded once with pip into `.downloads/` (git-ignored) and only these files are extracted.
"""

import os
import subprocess
import sys
import tarfile

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.path.join(REPOSITORY, "MSDSegment") not in sys.path:
    sys.path.insert(0, os.path.join(REPOSITORY, "MSDSegment"))

from MSDSegmentLib.atomic import atomic_open  # noqa: E402  (after the path set-up)
from MSDSegmentLib.modelcard import sha256_of  # noqa: E402
DOWNLOADS = os.path.join(REPOSITORY, ".downloads")
PACKAGE = "totalsegmentator==2.18.0"
ARCHIVE = "totalsegmentator-2.18.0.tar.gz"
# sha256 of the archive pip verified against PyPI; guards the cached copy against truncation or tampering.
ARCHIVE_SHA256 = "5d4223ef93973bc36d710869d11e7742ead2c154c72f7f9edcaaadd5b6c4bd03"
MEMBER_FOLDER = "totalsegmentator-2.18.0/tests/reference_files/"
SMALL_CT = "example_ct_sm.nii.gz"
SMALL_CT_SEGMENTATION = "example_seg.nii.gz"
ABDOMEN_PELVIS_CT = "example_ct.nii.gz"
SMALL_MR = "example_mr_sm.nii.gz"
# TotalSegmentator v2 class values in example_seg.nii.gz
REFERENCE_CLASSES = {"spleen": 1, "liver": 5, "pancreas": 7}
CREDIT = ("Example CT and reference segmentation: TotalSegmentator 2.18.0 test files "
          "(Wasserthal et al., Radiology: AI 2023), Apache-2.0")


class DataError(Exception):
    """The example data cannot be obtained (no network, corrupted download)."""


def download_archive(downloads=DOWNLOADS, say=print):
    """The source distribution, downloaded with pip unless a verified copy is already cached."""
    path = os.path.join(downloads, ARCHIVE)
    if os.path.isfile(path) and sha256_of(path) == ARCHIVE_SHA256:
        return path
    if os.path.isfile(path):
        say(f"{path} is corrupted (sha256 mismatch): downloading it again")
        os.remove(path)
    os.makedirs(downloads, exist_ok=True)
    say(f"Downloading the {PACKAGE} source distribution from PyPI (38 MB, once) into {downloads}")
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
               PACKAGE, "-d", downloads]
    completed = subprocess.run(command, capture_output=True, text=True)
    if completed.returncode != 0 or not os.path.isfile(path):
        reason = (completed.stderr.strip().splitlines() or ["no error message"])[-1]
        raise DataError(f"Cannot download {PACKAGE} from PyPI: {reason}")
    if sha256_of(path) != ARCHIVE_SHA256:
        os.remove(path)
        raise DataError(f"The downloaded {ARCHIVE} does not have the expected sha256 (removed it)")
    return path


def example_file(name, downloads=DOWNLOADS, say=print):
    """Path of one reference file, extracted (alone) from the cached archive on first use."""
    folder = os.path.join(downloads, "totalsegmentator-2.18.0-reference_files")
    path = os.path.join(folder, name)
    if os.path.isfile(path):
        return path
    archive = download_archive(downloads, say)
    os.makedirs(folder, exist_ok=True)
    with tarfile.open(archive, "r:gz") as tar:
        try:
            member = tar.getmember(MEMBER_FOLDER + name)
        except KeyError:
            raise DataError(f"{name} is not in {ARCHIVE}") from None
        source = tar.extractfile(member)
        # Written under our own name (never the archive's path) through a temporary file.
        with atomic_open(path, "wb") as target:
            target.write(source.read())
    return path
