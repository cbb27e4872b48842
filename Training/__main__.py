import os
import sys

from .cli import main

code = main()
sys.stdout.flush()
sys.stderr.flush()
# Leave without tearing the interpreter down: under torchrun, Gloo's worker threads can still hold tensors when the
# interpreter finalizes, and destroying them then aborts the process (SIGABRT, "terminate called without an active
# exception") after its work is done and its files are written, which fails the whole launch. Seen in the
# two-process replay test.
os._exit(code)
