"""`python -m MSDSegmentLib ...`: the engine's command line (see cli.py)."""

from .cli import run

run()
