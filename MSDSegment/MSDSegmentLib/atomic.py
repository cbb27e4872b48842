"""Writing files atomically: every file the engine, Training, the bench and the scripts write appears whole or
not at all. A run stopped part-way (an error, Ctrl+C, a full disk) leaves the old file, never half a new one, and
a resumed run that trusts what it finds on disk (a plan, a cache, a checkpoint) finds only whole files."""

import contextlib
import json
import os
import tempfile

from .errors import InputError


@contextlib.contextmanager
def atomic_output(path, suffix=""):
    """A temporary file name beside `path` for the block to write; renamed onto `path` only when the block
    succeeds, removed otherwise. `suffix` is the name's ending, for writers that choose a format by it (.nii.gz,
    .npz, .png). The file gets the permissions a plain open() would give (mkstemp's are 0600)."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise InputError(f"Output folder does not exist: {folder}")
    handle, temporary = tempfile.mkstemp(suffix=suffix, prefix=".msdsegment-", dir=folder)
    os.close(handle)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(temporary, 0o666 & ~umask)
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


@contextlib.contextmanager
def atomic_open(path, mode="w", **options):
    """open() for writing, atomically (atomic_output): text by default, UTF-8 unless `encoding` is given."""
    if "b" not in mode:
        options.setdefault("encoding", "utf-8")
    with atomic_output(path, os.path.splitext(path)[1]) as temporary, open(temporary, mode, **options) as stream:
        yield stream


def write_json(data, path):
    """`data` as indented JSON ending with a newline, atomically."""
    with atomic_open(path) as stream:
        json.dump(data, stream, indent=2)
        stream.write("\n")


def write_text(text, path):
    with atomic_open(path) as stream:
        stream.write(text)
