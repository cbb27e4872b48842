"""The documentation is written for its readers: a short README that starts with installing and using the
extension, no file that narrates the periods in which the work was done, and no link to a file that is not there."""

import os
import re
import subprocess

import pytest

from conftest import REPOSITORY

README = os.path.join(REPOSITORY, "README.md")
# Work-period narration: "Session 12", "this session", "earlier sessions" (a Slicer or pytest session is no period).
NARRATION = re.compile(r"\bsessions? \d+\b|\b(this|last|previous|earlier|next) sessions?\b", re.IGNORECASE)


def tracked_text_files():
    try:
        listing = subprocess.run(["git", "ls-files"], cwd=REPOSITORY, check=True, capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("needs the git repository to list the tracked files")
    for path in listing.stdout.splitlines():
        if path.endswith((".md", ".py", ".json", ".txt", ".cmake", ".ui", ".toml")) or path in ("Makefile",):
            yield path


def test_the_readme_is_short_and_starts_with_installing_and_the_quick_start():
    assert os.path.getsize(README) <= 15_000, os.path.getsize(README)
    with open(README, encoding="utf-8") as stream:
        lines = stream.read().splitlines()
    headings = {line.lstrip("# ").lower(): number for number, line in enumerate(lines, 1) if line.startswith("## ")}
    install = min(number for heading, number in headings.items() if heading.startswith("install"))
    quick_start = [number for heading, number in headings.items() if "panel" in heading or "command line" in heading]
    assert install <= 60 and quick_start and max(quick_start) <= 60, headings


def test_no_tracked_file_narrates_the_periods_in_which_work_was_done():
    found = []
    for path in tracked_text_files():
        with open(os.path.join(REPOSITORY, path), encoding="utf-8", errors="replace") as stream:
            for number, line in enumerate(stream, 1):
                if NARRATION.search(line):
                    found.append(f"{path}:{number}: {line.strip()[:100]}")
    assert not found, found


def test_every_relative_link_in_the_documentation_points_to_a_file_that_is_there():
    broken = []
    for path in tracked_text_files():
        if not path.endswith(".md"):
            continue
        with open(os.path.join(REPOSITORY, path), encoding="utf-8") as stream:
            text = stream.read()
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue
            file_part = target.split("#", 1)[0]
            if not os.path.exists(os.path.normpath(os.path.join(REPOSITORY, os.path.dirname(path), file_part))):
                broken.append(f"{path}: {target}")
    assert not broken, broken
