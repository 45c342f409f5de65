"""Installs loopwatch in every Python process started with this directory on ``PYTHONPATH``.

Used by ``tools/cpython_asyncio.py`` (``make asyncio-suite``) to run CPython's own ``test_asyncio`` with
loopwatch installed before any test starts -- in the test runner, its worker processes and every Python
child a test starts.  Options come from the ``LOOPWATCH_*`` variables the runner sets.  A
``sitecustomize`` that the environment already has (later on ``sys.path``) still runs, first.

With ``LOOPWATCH_SUITE_LOG`` set, each process appends one line there when it exits: its pid and what
the CPU loopwatch cost it (importing, installing, uninstalling), so the runner can tell a test that starts many
Python processes from one that loopwatch slowed down.
"""

import importlib.machinery
import importlib.util
import os
import sys
import time


def _chain() -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    others = [entry for entry in sys.path if os.path.abspath(entry or os.curdir) != here]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", others)
    if spec is None or spec.loader is None:
        return
    module = importlib.util.module_from_spec(spec)
    sys.modules["_loopwatch_chained_sitecustomize"] = module
    spec.loader.exec_module(module)


_chain()
_started = time.process_time()

import loopwatch  # noqa: E402 - after the chained sitecustomize, as the environment would have run it

loopwatch.install()
_installed = time.process_time() - _started


def _record() -> None:
    started = time.process_time()
    loopwatch.uninstall()
    cost = _installed + time.process_time() - started
    with open(os.environ["LOOPWATCH_SUITE_LOG"], "a") as log:
        log.write(f"{os.getpid()} {cost:.6f}\n")


if os.environ.get("LOOPWATCH_SUITE_LOG"):
    import atexit

    atexit.register(_record)  # registered after install(): runs first, so uninstall() is timed here
