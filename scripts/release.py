"""Make the release export that the Slicer Extensions Index builds: `make release`.

The index clones the repository that MSDSegment.json's `scm_url` names, with its whole history, and refuses it
when the clone (`.git` included) passes 100 MB. This development repository keeps every trained version of the
weights in its history, so it cannot be that repository. The release repository made here holds, in one commit per
release, the committed tree at HEAD with each weight file replaced by its sha256 pin (taken from the model cards,
written to Resources/Models/weights.cmake). The extension's CMake build fetches the pinned files and checks them
(CMake/MSDSegmentWeights.cmake). Weight files never enter the release history, so its size does not grow with
retraining, and every released commit stays buildable as long as the content-addressed weight files stay published.

Writes into --out (default build/release):
- SlicerMSDSegmentRelease/: the release repository (a new commit on top of the one already there, if any);
- weights/: each pinned weight file named <stem>-<first 16 hex digits of its sha256>.pt, to publish at the pins'
  URL (once: a file of the same name is never changed);
- MSDSegment.json: the Extensions Index description with scm_revision set to the release commit.
The last line printed is the release repository's path.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPOSITORY, "MSDSegment"))

from MSDSegmentLib import modelcard  # noqa: E402
from MSDSegmentLib.atomic import write_json  # noqa: E402

MODELS = os.path.join("MSDSegment", "Resources", "Models")
PINS = os.path.join(MODELS, "weights.cmake")
RELEASE_REPOSITORY = "SlicerMSDSegmentRelease"
WEIGHTS_URL = "https://github.com/msdsegment/SlicerMSDSegment/releases/download/weights"
# The Extensions Index refuses a clone over 100 MB; releases are held to 90 MB to leave room.
INDEX_LIMIT_BYTES = 100 * 1000 * 1000
RELEASE_LIMIT_BYTES = 90 * 1000 * 1000
# Commits made here need an identity even where git has none configured (CI, a fresh machine).
IDENTITY = {"GIT_AUTHOR_NAME": "MSDSegment release", "GIT_AUTHOR_EMAIL": "release@msdsegment.invalid",
            "GIT_COMMITTER_NAME": "MSDSegment release", "GIT_COMMITTER_EMAIL": "release@msdsegment.invalid"}


class ReleaseError(Exception):
    pass


def git(*arguments, cwd=REPOSITORY, capture=True):
    result = subprocess.run(["git", *arguments], cwd=cwd, capture_output=True, text=True,
                            env=dict(os.environ, **IDENTITY))
    if result.returncode:
        raise ReleaseError(f"git {' '.join(arguments)} failed: {result.stderr.strip()}")
    return result.stdout.strip() if capture else None


def export_head(source, destination):
    """The committed tree at HEAD (not the working tree: uncommitted changes are never released)."""
    with tempfile.TemporaryDirectory() as folder:
        archive = os.path.join(folder, "head.tar")
        git("archive", "--format=tar", "-o", archive, "HEAD", cwd=source)
        with tarfile.open(archive) as tar:
            safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}  # the filter exists from 3.11.4
            tar.extractall(destination, **safe)


def weight_pins(tree):
    """{weights file name: sha256} of every stage of every card in the exported tree, each checked against the
    file itself: a card whose pin does not match its weights would make a build that cannot load them."""
    pins = {}
    for card in modelcard.catalogue(os.path.join(tree, MODELS)).values():
        for stage in card.stages:
            if not os.path.isfile(stage.weights_path):
                raise ReleaseError(f"{card.task}: weights {stage.weights} are not committed")
            if modelcard.sha256_of(stage.weights_path) != stage.sha256:
                raise ReleaseError(f"{card.task}: {stage.weights} does not match the sha256 its card pins")
            if pins.setdefault(stage.weights, stage.sha256) != stage.sha256:
                raise ReleaseError(f"two cards pin different {stage.weights}")
    if not pins:
        raise ReleaseError("no model card with weights at HEAD")
    return pins


def published_name(weights, sha256):
    return f"{os.path.splitext(weights)[0]}-{sha256[:16]}.pt"


def pins_text(pins):
    entries = "".join(f'  "{weights}={sha256}"\n' for weights, sha256 in sorted(pins.items()))
    return ("# Written by `make release` from the model cards: each bundled weight file and its sha256. The build\n"
            "# fetches <stem>-<first 16 hex digits of the sha256>.pt from MSDSEGMENT_WEIGHTS_URL and checks it\n"
            "# (CMake/MSDSegmentWeights.cmake).\n"
            f'set(MSDSEGMENT_WEIGHTS_URL "{WEIGHTS_URL}" CACHE STRING "Where the pinned weight files are published")\n'
            f"set(MSDSEGMENT_WEIGHTS\n{entries}  )\n")


def move_weights_out(tree, pins, weights_folder):
    """Replace the weight files by their pins; the files go to the folder to publish."""
    os.makedirs(weights_folder, exist_ok=True)
    models = os.path.join(tree, MODELS)
    for name in os.listdir(models):
        if name.endswith(".pt"):
            path = os.path.join(models, name)
            if name in pins:
                shutil.copyfile(path, os.path.join(weights_folder, published_name(name, pins[name])))
            os.remove(path)  # a file no card names is not shipped either
    with open(os.path.join(tree, PINS), "w", encoding="utf-8") as stream:
        stream.write(pins_text(pins))


def commit_release(tree, repository, message):
    """Make the release repository's work tree the exported tree and commit it (one commit per release).
    Returns (commit, whether a new commit was made)."""
    if not os.path.isdir(os.path.join(repository, ".git")):
        os.makedirs(repository, exist_ok=True)
        git("init", "-q", cwd=repository)
        git("checkout", "-q", "-b", "main", cwd=repository)
    for name in os.listdir(repository):
        if name != ".git":
            path = os.path.join(repository, name)
            shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.remove(path)
    for name in os.listdir(tree):
        source = os.path.join(tree, name)
        target = os.path.join(repository, name)
        shutil.copytree(source, target, symlinks=True) if os.path.isdir(source) else shutil.copy2(source, target)
    git("add", "-A", cwd=repository)
    if not git("status", "--porcelain", cwd=repository):
        return git("rev-parse", "HEAD", cwd=repository), False  # the same tree as the last release
    git("commit", "-q", "-m", message, cwd=repository)
    return git("rev-parse", "HEAD", cwd=repository), True


def index_clone_size(url, revision, scratch):
    """Bytes of every file under a clone as the Extensions Index makes it with scm_revision set: the whole
    history (`git clone`, then `git checkout`), `.git` included. --no-local makes a local path behave as a remote
    (git packs what it sends instead of hard-linking the source's objects)."""
    folder = os.path.join(scratch, "index-clone")
    git("clone", "-q", "--no-local", url, folder, cwd=scratch)
    git("checkout", "-q", revision, cwd=folder)
    total = 0
    for root, _, names in os.walk(folder):
        for name in names:
            total += os.lstat(os.path.join(root, name)).st_size
    shutil.rmtree(folder)
    return total


def description(revision):
    with open(os.path.join(REPOSITORY, "MSDSegment.json"), encoding="utf-8") as stream:
        entry = json.load(stream)
    return dict(entry, scm_revision=revision)


def release(out, source=REPOSITORY):
    head = git("rev-parse", "HEAD", cwd=source)
    if git("status", "--porcelain", "--untracked-files=no", cwd=source):
        print("Note: uncommitted changes are not released; the release is HEAD", head[:12])
    out = os.path.abspath(out)
    repository = os.path.join(out, RELEASE_REPOSITORY)
    with tempfile.TemporaryDirectory(prefix="msdsegment-release-") as scratch:
        tree = os.path.join(scratch, "tree")
        export_head(source, tree)
        pins = weight_pins(tree)
        move_weights_out(tree, pins, os.path.join(out, "weights"))
        commit, new = commit_release(tree, repository, f"MSDSegment release of {head}")
        size = index_clone_size(repository, commit, scratch)
    write_json(description(commit), os.path.join(out, "MSDSegment.json"))
    print(f"{'New release commit' if new else 'Unchanged since the last release'} {commit[:12]} from {head[:12]}; "
          f"{len(pins)} weight files pinned, to publish from {os.path.join(out, 'weights')}")
    print(f"Extensions Index clone: {size / 1e6:.1f} MB (limit {INDEX_LIMIT_BYTES / 1e6:.0f} MB, "
          f"held to {RELEASE_LIMIT_BYTES / 1e6:.0f} MB)")
    if size > RELEASE_LIMIT_BYTES:
        raise ReleaseError(f"the release clone measures {size / 1e6:.1f} MB, over {RELEASE_LIMIT_BYTES / 1e6:.0f} MB")
    print(repository)
    return repository, commit, size


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.path.join(REPOSITORY, "build", "release"),
                        help="folder for the release repository, the weight files and the index description")
    arguments = parser.parse_args(argv)
    try:
        release(arguments.out)
    except ReleaseError as error:
        print(f"make release: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
