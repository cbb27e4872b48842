"""`make release`: the repository the Extensions Index clones, measured by the index's rule, and the build that
fetches and checks its pinned weights (CMake/MSDSegmentWeights.cmake, run by the real CMake)."""

import hashlib
import os
import shutil
import subprocess
import sys

import pytest

from conftest import REPOSITORY

sys.path.insert(0, os.path.join(REPOSITORY, "scripts"))

import release  # noqa: E402
from MSDSegmentLib import modelcard  # noqa: E402

MODELS = os.path.join(REPOSITORY, release.MODELS)


def card_pins(models_dir=MODELS):
    return {stage.weights: stage.sha256 for card in modelcard.catalogue(models_dir).values() for stage in card.stages}


def history_blobs(repository):
    """(path, size) of every file version anywhere in a repository's history."""
    listing = subprocess.run(["git", "rev-list", "--objects", "--all"], cwd=repository, check=True,
                             capture_output=True, text=True).stdout.split("\n")
    paths = dict(line.split(" ", 1) for line in listing if " " in line)
    sizes = subprocess.run(["git", "cat-file", "--batch-check=%(objectname) %(objecttype) %(objectsize)"],
                           input="\n".join(paths), cwd=repository, check=True, capture_output=True, text=True)
    blobs = []
    for line in sizes.stdout.splitlines():
        name, kind, size = line.split()
        if kind == "blob":
            blobs.append((paths[name], int(size)))
    return blobs


@pytest.fixture(scope="module")
def first_release(tmp_path_factory):
    if not os.path.isdir(os.path.join(REPOSITORY, ".git")):
        pytest.skip("make release needs the git repository (this is an exported tree)")
    out = str(tmp_path_factory.mktemp("release"))
    repository, commit, size = release.release(out)
    return out, repository, commit, size


def scratch_clone(tmp_path):
    """A clone of this repository to commit into (the test never commits here)."""
    folder = str(tmp_path / "development")
    subprocess.run(["git", "clone", "-q", REPOSITORY, folder], check=True)
    return folder


def commit_all(folder, message):
    subprocess.run(["git", "add", "-A"], cwd=folder, check=True)
    subprocess.run(["git", "commit", "-q", "-m", message], cwd=folder, check=True,
                   env=dict(os.environ, **release.IDENTITY))


def test_the_release_clone_measures_within_the_limit_and_its_history_holds_no_weights(first_release):
    out, repository, commit, size = first_release
    assert size <= release.RELEASE_LIMIT_BYTES, size
    # Measured again by the index's rule: clone of the whole history, checkout, every file counted.
    assert release.index_clone_size(repository, commit, out) == size
    blobs = history_blobs(repository)
    assert not [path for path, _ in blobs if path.endswith(".pt")]
    assert max(size for _, size in blobs) < 1_000_000, "a large file entered the release history"
    with open(os.path.join(out, "MSDSegment.json"), encoding="utf-8") as stream:
        assert f'"scm_revision": "{commit}"' in stream.read()


def test_the_release_is_the_committed_tree_with_each_weight_file_replaced_by_its_card_s_pin(first_release):
    _, repository, commit, _ = first_release
    committed = set(subprocess.run(["git", "ls-files"], cwd=REPOSITORY, check=True, capture_output=True,
                                   text=True).stdout.split("\n")) - {""}
    released = set(subprocess.run(["git", "ls-files"], cwd=repository, check=True, capture_output=True,
                                  text=True).stdout.split("\n")) - {""}
    weights = {path for path in committed if path.endswith(".pt")}
    assert weights and released == committed - weights | {release.PINS}
    with open(os.path.join(repository, release.PINS), encoding="utf-8") as stream:
        pins_file = stream.read()
    for weights_name, sha256 in card_pins().items():
        assert f'"{weights_name}={sha256}"' in pins_file


def cmake():
    beside_python = os.path.join(os.path.dirname(sys.executable), "cmake")
    found = beside_python if os.path.isfile(beside_python) else shutil.which("cmake")
    if not found:
        pytest.skip("cmake not found (pip install cmake, or the system's package)")
    return found


def configure_and_install(release_repository, weights_url, folder):
    """Configure the release's module CMake code the way an extension build includes it (Slicer's own macro that
    copies scripts is stood in for: what is checked is the weights' fetch, check, copy and install), then install."""
    project = os.path.join(folder, "project")
    os.makedirs(project)
    with open(os.path.join(project, "CMakeLists.txt"), "w", encoding="utf-8") as stream:
        stream.write("cmake_minimum_required(VERSION 3.16)\nproject(ReleaseBuild NONE)\n"
                     "set(Slicer_QTSCRIPTEDMODULES_LIB_DIR lib/Slicer-5.8/qt-scripted-modules)\n"
                     "set(Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR ${Slicer_QTSCRIPTEDMODULES_LIB_DIR})\n"
                     "macro(slicerMacroBuildScriptedModule)\nendmacro()\n"
                     f'add_subdirectory("{release_repository}/MSDSegment" MSDSegment)\n')
    build = os.path.join(folder, "build")
    configured = subprocess.run([cmake(), "-S", project, "-B", build, f"-DMSDSEGMENT_WEIGHTS_URL={weights_url}"],
                                capture_output=True, text=True)
    if configured.returncode:
        return configured, None
    installed = os.path.join(folder, "install")
    subprocess.run([cmake(), "--install", build, "--prefix", installed], check=True, capture_output=True)
    return configured, installed


def sha256_files(folder):
    return {name: hashlib.sha256(open(os.path.join(folder, name), "rb").read()).hexdigest()
            for name in os.listdir(folder) if name.endswith(".pt")}


def test_a_release_build_fetches_checks_and_packages_every_pinned_weight_file(first_release, tmp_path):
    out, repository, _, _ = first_release
    configured, installed = configure_and_install(repository, "file://" + os.path.join(out, "weights"),
                                                  str(tmp_path / "good"))
    assert installed, configured.stderr
    module = os.path.join("lib", "Slicer-5.8", "qt-scripted-modules", "Resources", "Models")
    assert sha256_files(os.path.join(installed, module)) == card_pins()  # packaged
    assert sha256_files(os.path.join(str(tmp_path / "good" / "build"), module)) == card_pins()  # build tree

    tampered = str(tmp_path / "tampered")
    shutil.copytree(os.path.join(out, "weights"), tampered)
    name = sorted(os.listdir(tampered))[0]
    with open(os.path.join(tampered, name), "r+b") as stream:
        stream.seek(1000)
        byte = stream.read(1)
        stream.seek(1000)
        stream.write(bytes([byte[0] ^ 0xFF]))
    configured, installed = configure_and_install(repository, "file://" + tampered, str(tmp_path / "bad"))
    assert installed is None and "HASH mismatch" in configured.stderr.replace("hash", "HASH"), configured.stderr
    fetched = str(tmp_path / "bad" / "build" / "MSDSegment" / "Weights")
    stem = name.rsplit("-", 1)[0]
    assert not os.path.exists(os.path.join(fetched, stem + ".pt")), "a file that failed its check was kept"


def test_retrained_weights_add_one_small_release_commit(first_release, tmp_path):
    """A model update: new weights committed in development, pinned in the next release; the release history
    still holds no weight file, and its clone stays within the limit."""
    out, repository, first_commit, first_size = first_release
    development = scratch_clone(tmp_path)
    models = os.path.join(development, release.MODELS)
    old = card_pins()["abdomen.pt"]
    with open(os.path.join(models, "abdomen.pt"), "ab") as stream:
        stream.write(b"retrained")  # stands for new weights: only the bytes and their hash matter here
    new = modelcard.sha256_of(os.path.join(models, "abdomen.pt"))
    for name in os.listdir(models):
        if name.endswith(".json"):
            path = os.path.join(models, name)
            with open(path, encoding="utf-8") as stream:
                text = stream.read()
            with open(path, "w", encoding="utf-8") as stream:
                stream.write(text.replace(old, new))
    commit_all(development, "Retrained abdomen.pt")
    later = str(tmp_path / "release")
    shutil.copytree(out, later, symlinks=True)
    repository = os.path.join(later, release.RELEASE_REPOSITORY)
    _, commit, size = release.release(later, source=development)
    parents = subprocess.run(["git", "rev-list", "--parents", "-n", "1", commit], cwd=repository, check=True,
                             capture_output=True, text=True).stdout.split()
    assert parents == [commit, first_commit]
    assert size <= release.RELEASE_LIMIT_BYTES and size - first_size < 100_000, (first_size, size)
    assert not [path for path, _ in history_blobs(repository) if path.endswith(".pt")]
    assert os.path.isfile(os.path.join(later, "weights", release.published_name("abdomen.pt", new)))
    assert release.release(later, source=development)[1] == commit  # nothing new: no empty release commit


def test_a_card_whose_pin_does_not_match_its_weights_is_not_released(tmp_path):
    if not os.path.isdir(os.path.join(REPOSITORY, ".git")):
        pytest.skip("make release needs the git repository (this is an exported tree)")
    development = scratch_clone(tmp_path)
    with open(os.path.join(development, release.MODELS, "prostate.pt"), "ab") as stream:
        stream.write(b"edited without its card")
    commit_all(development, "Weights changed, card not")
    out = str(tmp_path / "release")
    with pytest.raises(release.ReleaseError, match="prostate.pt does not match the sha256 its card pins"):
        release.release(out, source=development)
    assert not os.path.exists(os.path.join(out, release.RELEASE_REPOSITORY))
