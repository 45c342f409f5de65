"""loopwatch overhead benchmark: the same workloads with and without ``loopwatch.install()``, side by side.

    python -m benchmarks.overhead            # full run (about 10 minutes on 2 cores)
    python -m benchmarks.overhead --quick    # short run (about 4 minutes)

from the repository root (``make bench`` is the full run in the project's .venv).

Six figures, each a comparison measured in the same run (see benchmarks/README.md):

1. wall clock of a callback-heavy workload (tasks doing ``await asyncio.sleep(0)`` plus ``call_soon``
   chains), in interleaved with/without pairs, each run in a fresh process: median ratio and spread;
2. instructions per await-step on the loop thread, counted by ``valgrind --tool=callgrind
   --separate-threads=yes`` as the difference between two workload sizes (start-up cancels), with the
   periodic parts parked (valgrind slows time ~50x and the probe's work is time-based) and the
   per-iteration selector wrapper active;
3. idle CPU: an app that only sleeps, with loopwatch at its defaults and ``/metrics`` scraped once a
   second, versus the same app without loopwatch (CPU ms per wall second of the whole process);
4. the slow-callback hook's cost per callback (trivial ``call_soon`` callbacks, 1 and 20 per loop
   iteration): callgrind instructions and wall ns per callback without loopwatch, with its defaults
   (``slow_callback_mode="auto"``: selector wrapper), with ``slow_callback_mode="exact"``
   (``Handle._run`` wrapped) and under asyncio debug mode;
5. requests/s of a small aiohttp JSON service on loopback, loaded by ``wrk`` from a separate process,
   with and without loopwatch, in interleaved pairs of fresh server processes (plus the loop iterations
   per request at that load, from a separate counting server);
6. the same service's instructions per request on the loop thread under callgrind, at capacity and at
   low load, with loop iterations per request (``epoll_wait`` calls): the ≤ 1% HTTP verdict.

The table goes to stdout (progress to stderr); the JSON result to ``benchmarks/results/latest.json``.
``--check`` makes the exit status 3 when a target is missed (the wall-clock ones only when their whole
interquartile range is on the wrong side).  The package is also its own worker: ``python -m
benchmarks.overhead --worker wall|steps|idle|hooks|http`` is what the subprocesses run.

Modules: ``harness`` (what the benchmarks share: running workers, parsing their results and callgrind's
files, quantiles, verdicts), one module per figure holding its worker (what runs in the child), its
``bench_*`` driver and its section of the table -- ``wall`` (1), ``callgrind`` (2), ``idle`` (3), ``hooks``
(4), ``http_wrk`` (5, and the server of 6), ``http_callgrind`` (6) --, ``workers`` (the ``--worker`` registry),
``report`` (the headline and the table), ``cli`` (the options, the sizes per mode and the driver).
"""
