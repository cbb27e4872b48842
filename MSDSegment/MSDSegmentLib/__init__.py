"""MSDSegmentLib: the Qt-free MSDSegment engine.

Volume(s) in, an integer label map on exactly the input grid out. Used by the Slicer module
(`MSDSegment.py`), the command line (`python -m MSDSegmentLib`) and `Training/`.
Heavy dependencies (torch, MONAI) are imported lazily so that importing this package is cheap.
"""

__version__ = "0.1.0"
