"""The engine's worker with a fault injected, for the module's tests: `python faulty_engine.py KIND CALL ARGS...`.

KIND is RuntimeError or MemoryError (raised by engine.segment on its CALL-th call, as torch or numpy would
raise them) or crash (the process dies there, as under the system's out-of-memory killer). ARGS go to
`python -m MSDSegmentLib.worker`. Every other call runs the real engine."""

import os
import sys

from MSDSegmentLib import engine, worker


def main():
    kind, failing_call, arguments = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    real_segment = engine.segment
    calls = []

    def segment(*args, **kwargs):
        calls.append(1)
        if len(calls) == failing_call:
            if kind == "crash":
                print(f"engine process died on call {failing_call}", file=sys.stderr, flush=True)
                os._exit(3)
            raise {"RuntimeError": RuntimeError, "MemoryError": MemoryError}[kind](f"injected on call {failing_call}")
        return real_segment(*args, **kwargs)

    engine.segment = segment  # the worker's case runner looks it up at each call
    sys.stdout.flush()
    os._exit(worker.main(arguments))


if __name__ == "__main__":
    main()
