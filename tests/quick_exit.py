"""``python tests/quick_exit.py -m MODULE ARGS...`` or ``... SCRIPT ARGS...``: run the
module or script as ``python`` would, then end the process without the interpreter's
teardown.

A process that has loaded TensorFlow spends 0.7-1.2 CPU-s at exit freeing its
modules, one object at a time; the tests launch over a hundred such ranks, on two
cores. This runs everything a normal exit runs that a test can see: the exit status
(``sys.exit``'s code, printed to stderr as Python does when it is not an int), the
non-daemon threads joined, the ``atexit`` handlers, the flushed streams and
``MPI_Finalize`` (mpi4py registers it below ``atexit``, so it is called here). An
uncaught exception is left to Python: traceback, status 1, and mpi4py's abort.
"""

import atexit
import os
import runpy
import sys
import threading


def _run(argv: list[str]) -> None:
    if argv[:1] == ["-m"]:
        module = argv[1]
        sys.argv = [module, *argv[2:]]
        sys.path[0] = os.getcwd()  # as ``python -m``: the working directory first
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    else:
        script = argv[0]
        sys.argv = list(argv)
        sys.path[0] = os.path.dirname(os.path.abspath(script))  # as ``python SCRIPT``
        runpy.run_path(script, run_name="__main__")


def _status(code: object) -> int:
    """The exit status Python gives ``SystemExit(code)``."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    print(code, file=sys.stderr)
    return 1


def main() -> None:
    try:
        _run(sys.argv[1:])
        status = 0
    except SystemExit as exc:
        status = _status(exc.code)
    for thread in threading.enumerate():
        if thread is not threading.main_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
        mpi.Finalize()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


if __name__ == "__main__":
    main()
