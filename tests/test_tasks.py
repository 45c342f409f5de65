"""Task health: the ``tasks`` gauge, exceptions that reach the loop's exception handler (counted while the
app's own handler -- or asyncio's default one -- still runs exactly once per event), tasks destroyed while
pending, ``watch_queue`` and its errors; on the stdlib loop and uvloop.

In-process tests run real loops and scrape from another thread (``asyncio.to_thread``), as the exporter
does; the end-to-end tests run tests/apps/tasks_exceptions.py in a subprocess and scrape it over HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import gc
import json
import logging
import queue as thread_queue
import re
import time
import warnings
import weakref
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs
import uvloop
from conftest import collected, free_port, sample, scrape, wait_for

import loopwatch

NS = "loopwatch"
IMPLS = ["asyncio", "uvloop"]
ANSI = re.compile(r"\x1b\[[0-9;]*m")


class Boom(Exception):
    """Defined in this module: its label is ``test_tasks.Boom``."""


@pytest.fixture(autouse=True)
def _earlier_garbage_collected() -> None:
    """These tests run ``gc.collect()`` to destroy tasks; garbage left by earlier tests (an unclosed pipe
    of a failed subprocess test, say) would then be finalized here and its ResourceWarning, an error under
    ``filterwarnings = error``, blamed on this test.  Collect it first, outside the test."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()


def run(impl: str, coro: Coroutine[Any, Any, Any]) -> Any:
    return (uvloop.run if impl == "uvloop" else asyncio.run)(coro)


def install(registry, tmp_path: Path) -> loopwatch.Agent:
    return loopwatch.install(registry=registry, metrics_port=0, dump_dir=tmp_path)


async def scrape_from_another_thread(registry) -> dict:
    return await asyncio.to_thread(collected, registry)


def metric(samples: dict, name: str, **labels: str) -> float | None:
    return sample(samples, f"{NS}_{name}", **labels)


def exceptions(samples: dict) -> dict[str, float]:
    return {dict(labels)["exception"]: value for (name, labels), value in samples.items()
            if name == f"{NS}_task_exceptions_total"}


def raiser(exc: BaseException) -> Callable[[], None]:
    def callback() -> None:
        raise exc
    return callback


async def fail(exc: BaseException) -> None:
    raise exc


async def unretrieved(exc: BaseException) -> None:
    """A task fails and is dropped without anyone retrieving its exception."""
    task = asyncio.ensure_future(fail(exc))
    await asyncio.sleep(0.01)
    assert task.done()
    del task
    gc.collect()


async def destroyed_pending() -> None:
    """A task still waiting on a future nobody else holds is garbage-collected."""
    async def wait_on(future: asyncio.Future) -> None:
        await future

    future = asyncio.get_running_loop().create_future()
    task = asyncio.ensure_future(wait_on(future))
    await asyncio.sleep(0.01)
    del task, future
    gc.collect()


# -- exceptions: counted, and the app's handler still runs exactly once per event --------------------
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("handler_set", ["before_install", "after_install"])
def test_exceptions_are_counted_and_the_apps_handler_runs_once_per_event(registry, tmp_path, impl, handler_set):
    value_errors = [ValueError("a"), ValueError("b")]
    boom = Boom("task")
    decode_error = json.JSONDecodeError("bad", "{", 0)

    async def main():
        loop = asyncio.get_running_loop()
        seen: list[dict] = []

        def handler(_loop, context):
            seen.append(context)

        if handler_set == "before_install":
            loop.set_exception_handler(handler)
        install(registry, tmp_path)
        if handler_set == "after_install":
            loop.set_exception_handler(handler)
        before = time.time()
        for exc in value_errors:
            loop.call_soon(raiser(exc))
        loop.call_soon(raiser(decode_error))
        await asyncio.sleep(0.01)
        await unretrieved(boom)
        await destroyed_pending()
        after = time.time()
        return seen, await scrape_from_another_thread(registry), before, after

    seen, samples, before, after = run(impl, main())
    # the app's handler saw every event exactly once, with the original context
    assert [c.get("exception") for c in seen] == [*value_errors, decode_error, boom, None]
    assert seen[3]["message"] == "Task exception was never retrieved"
    assert seen[4]["message"] == "Task was destroyed but it is pending!"
    # ... and loopwatch counted the same events
    assert exceptions(samples) == {"ValueError": 2.0, "json.decoder.JSONDecodeError": 1.0, "test_tasks.Boom": 1.0}
    assert metric(samples, "tasks_destroyed_pending_total") == 1.0
    assert sum(exceptions(samples).values()) + metric(samples, "tasks_destroyed_pending_total") == len(seen)
    assert before <= metric(samples, "last_exception_timestamp_seconds") <= after
    assert metric(samples, "errors_total", component="hooks") == 0.0


@pytest.mark.parametrize("impl", IMPLS)
def test_default_handler_still_logs_when_the_app_set_none(registry, tmp_path, impl, caplog):
    async def main():
        install(registry, tmp_path)
        loop = asyncio.get_running_loop()
        loop.call_soon(raiser(KeyError("k")))
        await asyncio.sleep(0.01)
        await unretrieved(Boom("task"))
        await destroyed_pending()
        return await scrape_from_another_thread(registry)

    with caplog.at_level(logging.ERROR, logger="asyncio"):
        samples = run(impl, main())
    logged = [(r.name, r.getMessage().splitlines()[0]) for r in caplog.records]
    assert [name for name, _ in logged] == ["asyncio"] * 3, logged
    assert logged[0][1].startswith("Exception in callback"), logged
    assert logged[1][1] == "Task exception was never retrieved"
    assert logged[2][1] == "Task was destroyed but it is pending!"
    assert [type(r.exc_info[1]) if r.exc_info else None for r in caplog.records] == [KeyError, Boom, None]
    assert exceptions(samples) == {"KeyError": 1.0, "test_tasks.Boom": 1.0}
    assert metric(samples, "tasks_destroyed_pending_total") == 1.0


@pytest.mark.parametrize("impl", IMPLS)
def test_destroyed_pending_tasks_are_counted_apart(registry, tmp_path, impl):
    async def main():
        loop = asyncio.get_running_loop()
        seen: list[str] = []
        loop.set_exception_handler(lambda _loop, context: seen.append(context["message"]))
        install(registry, tmp_path)
        first = await scrape_from_another_thread(registry)
        await destroyed_pending()
        await destroyed_pending()
        return seen, first, await scrape_from_another_thread(registry)

    seen, first, samples = run(impl, main())
    assert seen == ["Task was destroyed but it is pending!"] * 2
    # exported from the start: 0 and "never"
    assert metric(first, "tasks_destroyed_pending_total") == 0.0
    assert metric(first, "last_exception_timestamp_seconds") == 0.0
    assert metric(samples, "tasks_destroyed_pending_total") == 2.0
    assert exceptions(samples) == {}  # no exception object: not a task exception
    assert metric(samples, "last_exception_timestamp_seconds") == 0.0


def test_exception_labels_are_bounded(registry, tmp_path):
    kinds = [type(f"Error{i:02d}", (Exception,), {"__module__": "generated"}) for i in range(25)]

    async def main():
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(lambda _loop, context: None)
        install(registry, tmp_path)
        for i, kind in enumerate(kinds):
            for _ in range(1 if i >= 5 else 3):  # the first five are the most frequent
                loop.call_soon(raiser(kind()))
        await asyncio.sleep(0.05)
        return await scrape_from_another_thread(registry)

    counted = exceptions(asyncio.run(main()))
    assert len(counted) == 21  # top 20 + other
    assert {f"generated.Error{i:02d}" for i in range(5)} <= set(counted)
    assert counted["other"] == 5.0
    assert sum(counted.values()) == 5 * 3 + 20


# -- the chaining never raises, and is undone ----------------------------------------------------------
def test_the_chained_handler_never_raises_and_still_calls_the_apps(registry, tmp_path):
    weird = ["not", "a", "dict"]

    async def main(with_loopwatch: bool):
        loop = asyncio.get_running_loop()
        seen: list[object] = []
        loop.set_exception_handler(lambda _loop, context: seen.append(context))
        if with_loopwatch:
            install(registry, tmp_path)
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            loop.call_exception_handler(weird)  # a broken caller: loopwatch's counting fails, quietly
        return seen, (await scrape_from_another_thread(registry)) if with_loopwatch else None

    # What asyncio itself does with such a call differs by version (3.12 reads context.get() before
    # calling the handler): loopwatch must change none of it.
    baseline, _ = asyncio.run(main(False))
    seen, samples = asyncio.run(main(True))
    assert seen == baseline
    assert all(item is weird for item in seen)
    assert metric(samples, "errors_total", component="hooks") == 1.0
    assert exceptions(samples) == {}


@pytest.mark.parametrize("impl", IMPLS)
def test_uninstall_gives_the_loop_its_own_method_back(registry, tmp_path, impl):
    async def main():
        loop = asyncio.get_running_loop()
        seen: list[dict] = []
        loop.set_exception_handler(lambda _loop, context: seen.append(context))
        install(registry, tmp_path)
        chained = "call_exception_handler" in vars(loop)
        loopwatch.uninstall()
        restored = "call_exception_handler" not in vars(loop)
        bound = loop.call_exception_handler.__func__ is type(loop).call_exception_handler
        loop.call_soon(raiser(ValueError("after uninstall")))
        await asyncio.sleep(0.01)
        return chained, restored, bound, seen

    chained, restored, bound, seen = run(impl, main())
    assert chained and restored and bound
    assert [str(c["exception"]) for c in seen] == ["after uninstall"]


def test_an_attribute_set_before_install_is_left_alone(registry, tmp_path):
    async def main():
        loop = asyncio.get_running_loop()
        reported: list[dict] = []

        def report_then_handle(context):  # e.g. an error tracker (or a test's Mock) that patched the instance
            reported.append(context)
            return type(loop).call_exception_handler(loop, context)

        handled: list[dict] = []
        loop.set_exception_handler(lambda _loop, context: handled.append(context))
        loop.call_exception_handler = report_then_handle
        with capture_logs() as logs:
            install(registry, tmp_path)
        untouched = vars(loop)["call_exception_handler"] is report_then_handle
        loop.call_soon(raiser(ValueError("x")))
        await asyncio.sleep(0.01)
        samples = await scrape_from_another_thread(registry)
        loopwatch.uninstall()
        kept = vars(loop)["call_exception_handler"] is report_then_handle
        del loop.call_exception_handler
        return reported, handled, samples, untouched, kept, logs

    reported, handled, samples, untouched, kept, logs = asyncio.run(main())
    assert len(reported) == len(handled) == 1
    assert untouched and kept  # not wrapped: theirs is what the loop calls, and stays
    assert exceptions(samples) == {}  # so this loop's exceptions are not counted, and a debug note says so
    notes = [e for e in logs if e["event"] == "loopwatch.not_patched"]
    assert [e["log_level"] for e in notes] == ["debug"]
    assert "call_exception_handler was already replaced on the instance" in notes[0]["reason"]


def test_a_wrapper_set_over_ours_keeps_working_after_uninstall(registry, tmp_path):
    async def main():
        loop = asyncio.get_running_loop()
        handled: list[str] = []
        loop.set_exception_handler(lambda _loop, context: handled.append(str(context["exception"])))
        install(registry, tmp_path)
        ours = loop.call_exception_handler
        wrapped: list[str] = []

        def theirs(context):  # installed after loopwatch: wraps loopwatch's wrapper
            wrapped.append(str(context["exception"]))
            return ours(context)

        loop.call_exception_handler = theirs
        loop.call_soon(raiser(ValueError("one")))
        await asyncio.sleep(0.01)
        first = exceptions(await scrape_from_another_thread(registry))
        loopwatch.uninstall()
        still_theirs = vars(loop)["call_exception_handler"] is theirs
        # installed again: theirs is on the instance now, so it is left alone; the old wrapper passes through
        install(registry, tmp_path)
        loop.call_soon(raiser(ValueError("two")))
        await asyncio.sleep(0.01)
        second = exceptions(await scrape_from_another_thread(registry))
        loopwatch.uninstall()
        del loop.call_exception_handler
        return handled, wrapped, first, still_theirs, second

    handled, wrapped, first, still_theirs, second = asyncio.run(main())
    assert handled == wrapped == ["one", "two"]
    assert first == {"ValueError": 1.0}
    assert still_theirs
    assert second == {}  # not chained over theirs, and the old wrapper is inert: nothing counted twice


def test_closed_loop_is_unchained_and_a_dropped_loop_is_freed_at_once(registry, tmp_path):
    agent = install(registry, tmp_path)

    async def main():
        return asyncio.get_running_loop()

    loop = asyncio.run(main())  # attached by the hooks, closed by asyncio.run; still referenced here
    assert loop.is_closed()
    wait_for(lambda: "call_exception_handler" not in vars(loop), timeout=15.0,
             what="the closed loop's handler to be unchained")
    assert agent.snapshot().loops == ()
    del loop

    async def ref():
        return weakref.ref(asyncio.get_running_loop())

    gc.disable()  # no reference cycle through the chained handler: refcounting alone frees the loop
    try:
        dropped = asyncio.run(ref())
        assert dropped() is None
    finally:
        gc.enable()


def test_counts_start_from_zero_in_a_forked_child(registry, tmp_path):
    """``TaskHealth.after_fork`` is what a forked child runs (see loopwatch/_forksafe.py): task-health
    counts restart, watched queues stay watched."""
    agent = install(registry, tmp_path)
    jobs = loopwatch.watch_queue(asyncio.Queue(4), "jobs")
    jobs.put_nowait(1)

    async def main():
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(lambda _loop, context: None)
        loop.call_soon(raiser(ValueError("parent")))
        await asyncio.sleep(0.01)
        await destroyed_pending()
        before = await scrape_from_another_thread(registry)
        agent.task_health.after_fork()
        after = await scrape_from_another_thread(registry)
        loop.call_soon(raiser(KeyError("child")))
        await asyncio.sleep(0.01)
        return before, after, await scrape_from_another_thread(registry)

    before, after, later = asyncio.run(main())
    assert exceptions(before) == {"ValueError": 1.0}
    assert metric(before, "tasks_destroyed_pending_total") == 1.0
    assert exceptions(after) == {}
    assert metric(after, "tasks_destroyed_pending_total") == 0.0
    assert metric(after, "last_exception_timestamp_seconds") == 0.0
    assert metric(after, "queue_depth", queue="jobs") == 1.0
    assert exceptions(later) == {"KeyError": 1.0}  # and counting goes on


# -- the tasks gauge --------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", IMPLS)
def test_tasks_gauge_tracks_live_tasks(registry, tmp_path, impl):
    async def main():
        install(registry, tmp_path)
        counts = [metric(await scrape_from_another_thread(registry), "tasks", loop="main")]
        release = asyncio.Event()
        tasks = [asyncio.create_task(release.wait()) for _ in range(5)]
        sleepers = [asyncio.create_task(asyncio.sleep(3600)) for _ in range(2)]
        await asyncio.sleep(0)
        counts.append(metric(await scrape_from_another_thread(registry), "tasks", loop="main"))
        release.set()
        await asyncio.gather(*tasks)
        counts.append(metric(await scrape_from_another_thread(registry), "tasks", loop="main"))
        for task in sleepers:
            task.cancel()
        await asyncio.gather(*sleepers, return_exceptions=True)
        counts.append(metric(await scrape_from_another_thread(registry), "tasks", loop="main"))
        return counts

    assert run(impl, main()) == [1.0, 8.0, 3.0, 1.0]  # main() itself, + 7, - 5 done, - 2 cancelled


@pytest.mark.parametrize("impl", IMPLS)
def test_tasks_gauge_read_while_the_loop_churns_tasks(registry, tmp_path, impl):
    """Scrapes from another thread while the loop creates and finishes tasks as fast as it can."""
    async def main():
        install(registry, tmp_path)
        stop = asyncio.Event()
        created = 0

        async def churn():
            nonlocal created
            while not stop.is_set():
                batch = [asyncio.create_task(asyncio.sleep(0)) for _ in range(50)]
                created += len(batch)
                await asyncio.gather(*batch)

        def scrape_many():
            values, deadline = [], time.monotonic() + 10.0
            while (len(values) < 40 or created < 2000) and time.monotonic() < deadline:
                values.append(metric(collected(registry), "tasks", loop="main"))
            return values

        churner = asyncio.create_task(churn())
        values = await asyncio.to_thread(scrape_many)
        stop.set()
        await churner
        return created, values, collected(registry)

    created, values, samples = run(impl, main())
    assert created >= 2000
    assert all(v is not None and 1.0 <= v <= 52.0 for v in values), values  # main + churn + <= 50
    assert metric(samples, "errors_total", component="collector") == 0.0


def test_tasks_gauge_retries_a_set_that_changed_size(registry, tmp_path):
    """The task set read from the scrape thread can change under it; a few failures are retried."""
    agent = install(registry, tmp_path)
    failures = {"left": 2}

    def flaky(loop):
        if failures["left"]:
            failures["left"] -= 1
            raise RuntimeError("Set changed size during iteration")
        return asyncio.all_tasks(loop)

    agent.task_health._all_tasks = flaky

    async def main():
        await asyncio.sleep(0)
        return await scrape_from_another_thread(registry)

    samples = asyncio.run(main())
    assert failures["left"] == 0
    assert metric(samples, "tasks", loop="main") == 1.0
    assert metric(samples, "errors_total", component="collector") == 0.0


def test_tasks_gauge_skips_a_loop_it_cannot_read_and_counts_an_error(registry, tmp_path):
    agent = install(registry, tmp_path)

    def always_changing(loop):
        raise RuntimeError("Set changed size during iteration")

    agent.task_health._all_tasks = always_changing

    async def main():
        await asyncio.sleep(0)
        return await scrape_from_another_thread(registry)

    samples = asyncio.run(main())
    assert metric(samples, "tasks", loop="main") is None
    # errors_total is collected before the task-health part: the failure shows from the next scrape on
    assert metric(collected(registry), "errors_total", component="collector") >= 1.0
    # the rest of the scrape is whole
    assert metric(samples, "event_loop_lag_seconds", loop="main") is not None
    assert metric(samples, "tasks_destroyed_pending_total") == 0.0


# -- watch_queue ------------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", IMPLS)
def test_queue_gauges_follow_put_and_get(registry, tmp_path, impl):
    async def main():
        install(registry, tmp_path)
        jobs = loopwatch.watch_queue(asyncio.Queue(maxsize=3), "jobs")
        prio = loopwatch.watch_queue(asyncio.PriorityQueue(), "prio")
        lifo = loopwatch.watch_queue(asyncio.LifoQueue(maxsize=5), "lifo")
        seen = []

        async def look():
            samples = await scrape_from_another_thread(registry)
            seen.append({q: (metric(samples, "queue_depth", queue=q), metric(samples, "queue_maxsize", queue=q))
                         for q in ("jobs", "prio", "lifo")})

        await look()  # exported at once
        await jobs.put("a")
        await jobs.put("b")
        prio.put_nowait((1, "x"))
        await look()
        await jobs.get()
        await lifo.put(1)
        await look()
        await jobs.put("c")
        await jobs.put("d")  # full
        assert jobs.full()
        await look()
        return seen

    assert run(impl, main()) == [
        {"jobs": (0.0, 3.0), "prio": (0.0, 0.0), "lifo": (0.0, 5.0)},
        {"jobs": (2.0, 3.0), "prio": (1.0, 0.0), "lifo": (0.0, 5.0)},
        {"jobs": (1.0, 3.0), "prio": (1.0, 0.0), "lifo": (1.0, 5.0)},
        {"jobs": (3.0, 3.0), "prio": (1.0, 0.0), "lifo": (1.0, 5.0)},
    ]


def test_a_collected_queue_is_not_kept_alive_and_its_series_disappear(registry, tmp_path):
    install(registry, tmp_path)
    jobs = loopwatch.watch_queue(asyncio.Queue(), "jobs")  # created and watched outside any loop
    other = loopwatch.watch_queue(asyncio.Queue(7), "other")
    assert metric(collected(registry), "queue_depth", queue="jobs") == 0.0
    ref = weakref.ref(jobs)
    del jobs
    assert ref() is None  # watching holds no strong reference
    samples = collected(registry)
    assert metric(samples, "queue_depth", queue="jobs") is None
    assert metric(samples, "queue_maxsize", queue="jobs") is None
    assert metric(samples, "queue_maxsize", queue="other") == 7.0
    # its name is free again
    again = loopwatch.watch_queue(asyncio.Queue(2), "jobs")
    assert metric(collected(registry), "queue_maxsize", queue="jobs") == 2.0
    assert again is not None and other is not None


def test_watch_queue_returns_its_queue_and_is_idempotent(registry, tmp_path):
    install(registry, tmp_path)
    jobs = asyncio.Queue()
    assert loopwatch.watch_queue(jobs, "jobs") is jobs
    assert loopwatch.watch_queue(jobs, "jobs") is jobs
    assert [name for (name, labels) in collected(registry) if name == f"{NS}_queue_depth"] == [f"{NS}_queue_depth"]


@pytest.mark.parametrize("queue, name, message", [
    (thread_queue.Queue(), "jobs",
     "watch_queue() watches asyncio.Queue and its subclasses (asyncio.PriorityQueue, asyncio.LifoQueue), "
     "got queue.Queue"),
    ([], "jobs",
     "watch_queue() watches asyncio.Queue and its subclasses (asyncio.PriorityQueue, asyncio.LifoQueue), "
     "got list"),
    (None, "jobs",
     "watch_queue() watches asyncio.Queue and its subclasses (asyncio.PriorityQueue, asyncio.LifoQueue), "
     "got NoneType"),
    (asyncio.Queue(), "",
     "watch_queue() name must be a non-empty printable string of at most 128 characters without "
     "surrounding spaces, got ''"),
    (asyncio.Queue(), 42,
     "watch_queue() name must be a non-empty printable string of at most 128 characters without "
     "surrounding spaces, got 42"),
    (asyncio.Queue(), "a\nb",
     "watch_queue() name must be a non-empty printable string of at most 128 characters without "
     "surrounding spaces, got 'a\\nb'"),
    (asyncio.Queue(), " jobs",
     "watch_queue() name must be a non-empty printable string of at most 128 characters without "
     "surrounding spaces, got ' jobs'"),
    (asyncio.Queue(), "x" * 129,
     "watch_queue() name must be a non-empty printable string of at most 128 characters without "
     f"surrounding spaces, got '{'x' * 129}'"),
])
def test_watch_queue_refuses_what_it_cannot_watch(registry, tmp_path, queue, name, message):
    install(registry, tmp_path)
    with pytest.raises(loopwatch.ConfigError) as info:
        loopwatch.watch_queue(queue, name)
    assert str(info.value) == message
    assert isinstance(info.value, ValueError)
    assert [name for (name, _) in collected(registry) if name == f"{NS}_queue_depth"] == []


def test_watch_queue_names_are_unique(registry, tmp_path):
    install(registry, tmp_path)
    jobs = loopwatch.watch_queue(asyncio.Queue(), "jobs")
    with pytest.raises(loopwatch.ConfigError) as info:
        loopwatch.watch_queue(asyncio.Queue(), "jobs")
    assert str(info.value) == ("watch_queue(): name 'jobs' is already used by another live queue; "
                               "names must be unique")
    with pytest.raises(loopwatch.ConfigError) as info:
        loopwatch.watch_queue(jobs, "jobs-again")
    assert str(info.value) == "watch_queue(): this queue is already watched as 'jobs', got name 'jobs-again'"
    assert metric(collected(registry), "queue_depth", queue="jobs-again") is None


def test_watched_queues_are_bounded(registry, tmp_path):
    install(registry, tmp_path)
    kept = [loopwatch.watch_queue(asyncio.Queue(), f"q{i}") for i in range(1000)]
    with pytest.raises(loopwatch.ConfigError) as info:
        loopwatch.watch_queue(asyncio.Queue(), "one-too-many")
    assert str(info.value) == "watch_queue(): at most 1000 queues can be watched at once"
    del kept[0]  # a collected queue frees its slot
    assert loopwatch.watch_queue(asyncio.Queue(), "one-more") is not None


def test_watch_queue_needs_an_installed_agent(registry, tmp_path):
    message = "loopwatch is not installed: call loopwatch.install() before loopwatch.watch_queue()"
    with pytest.raises(RuntimeError) as info:
        loopwatch.watch_queue(asyncio.Queue(), "jobs")
    assert str(info.value) == message
    with pytest.raises(loopwatch.ConfigError):  # bad arguments are refused the same way either way
        loopwatch.watch_queue([], "jobs")
    install(registry, tmp_path)
    kept = loopwatch.watch_queue(asyncio.Queue(), "jobs")
    loopwatch.uninstall()
    with pytest.raises(RuntimeError) as info:
        loopwatch.watch_queue(asyncio.Queue(), "jobs")
    assert str(info.value) == message
    install(registry, tmp_path)  # a new agent starts with no watched queue
    assert metric(collected(registry), "queue_depth", queue="jobs") is None
    assert loopwatch.watch_queue(kept, "jobs") is kept


# -- end to end: a subprocess app scraped over HTTP -------------------------------------------------
@pytest.mark.parametrize("impl, loop_class", [("asyncio", "asyncio.unix_events._UnixSelectorEventLoop"),
                                              ("uvloop", "uvloop.Loop")])
@pytest.mark.parametrize("handler", ["app", "none"])
def test_exceptions_end_to_end(app_runner, tmp_path, impl, loop_class, handler):
    port = free_port()
    stop = tmp_path / "stop"
    app = app_runner("tasks_exceptions", impl, handler, str(tmp_path / "dumps"), str(port), str(stop))
    url = app.wait_line("READY").split()[1]
    assert app.wait_line("loop-class") == f"loop-class {loop_class}"
    done = app.wait_line("DONE")
    calls = int(re.search(r"calls=(\d+)", done).group(1))
    start, end = (float(re.search(rf"{key}=([0-9.]+)", done).group(1)) for key in ("start", "end"))
    samples = scrape(url)
    counted = {dict(labels)["exception"]: value for (name, labels), value in samples.items()
               if name == "lwtasks_task_exceptions_total"}
    assert counted == {"ValueError": 3.0, "tasks_common.Boom": 2.0, "tasks_common.Errors.Timeout": 1.0}
    assert sample(samples, "lwtasks_tasks_destroyed_pending_total") == 1.0
    assert start <= sample(samples, "lwtasks_last_exception_timestamp_seconds") <= end
    assert sample(samples, "lwtasks_tasks", loop="main") == 5.0  # main() + 4 sleepers
    assert sample(samples, "lwtasks_errors_total", component="hooks") == 0.0
    stop.touch()
    out = ANSI.sub("", app.finish(timeout=30))
    assert app.proc.returncode == 0, out
    logs = "\n".join(line for line in out.splitlines() if "HANDLER-MESSAGES" not in line)
    default_logs = (logs.count("Task exception was never retrieved"), logs.count("Exception in callback"),
                    logs.count("Task was destroyed but it is pending!"))
    if handler == "app":
        assert calls == 7 == sum(counted.values()) + 1  # every event reached the app's handler, once
        assert default_logs == (0, 0, 0), out
        messages = app.marker("HANDLER-MESSAGES")
        assert messages is not None, out
        assert messages.count("'Task exception was never retrieved'") == 3
        assert messages.count("'Task was destroyed but it is pending!'") == 1
    else:
        assert calls == 0
        assert default_logs == (3, 3, 1), out  # asyncio's default handler logged each one, once
        assert "tasks_common.Boom: a callback failed" in out
        assert "tasks_common.Errors.Timeout: a nested error class" in out
