"""Headless training of the MSDSegment models (see Training/README.md)."""

import os
import sys

# Training imports the engine (network, preprocessing, model cards) from the module folder.
_MODULE_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "MSDSegment")
if _MODULE_DIR not in sys.path:
    sys.path.insert(0, _MODULE_DIR)
