"""One patching rule for every global patch site (issue: "one patching utility"): loopwatch chains to
whatever is installed when it patches, and at ``uninstall()`` restores the original only if the patch is
still its own; otherwise it leaves a pass-through.  Checked with another library patching the same
attribute after loopwatch, before and after ``uninstall()``: both keep working, and theirs stays."""

from __future__ import annotations

import asyncio
import asyncio.events as events
import time
import types
from pathlib import Path

from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs

import loopwatch
from loopwatch._patch import Patch

ORIGINAL_RUN = events.Handle._run
ORIGINAL_SET_RUNNING_LOOP = events._set_running_loop


# -- the utility --------------------------------------------------------------------------------------

def counting(calls: list[str], tag: str, original):  # noqa: ANN001, ANN201
    def wrapper(*args):  # noqa: ANN002, ANN202
        calls.append(tag)
        return original(*args)
    return wrapper


def test_a_patch_chains_to_what_is_there_and_is_undone_when_it_is_still_on_top() -> None:
    owner = types.SimpleNamespace(f=lambda x: x + 1)
    base = owner.f
    calls: list[str] = []
    seen: list[object] = []
    patch = Patch(owner, "f", lambda original: seen.append(original) or counting(calls, "ours", original)).apply()
    assert owner.f(1) == 2 and calls == ["ours"] and seen == [base]
    assert patch.in_chain and patch.on_top
    assert patch.undo() is True
    assert owner.f is base


def test_in_chain_tells_a_patch_under_someone_elses_from_one_they_took_out() -> None:
    owner = types.SimpleNamespace(f=lambda x: x + 1)
    base = owner.f
    patch = Patch(owner, "f", lambda original: counting([], "ours", original)).apply()
    owner.f = counting([], "theirs", owner.f)  # on top of ours: ours is still called through theirs
    assert patch.in_chain and not patch.on_top
    owner.f = base  # they put the original back: ours is out of every chain
    assert not patch.in_chain


class _Pool:  # an instance-level site: an object loopwatch must never keep alive
    def acquire(self) -> str:
        return "connection"


def test_an_instance_patch_keeps_neither_the_object_nor_a_refused_assignment() -> None:
    import gc
    import weakref

    pool = _Pool()
    patch = Patch(pool, "acquire", lambda original: counting([], "ours", original)).apply()
    assert pool.acquire() == "connection" and "acquire" in vars(pool)
    assert patch.undo() is True and "acquire" not in vars(pool)
    patch = Patch(pool, "acquire", lambda original: counting([], "ours", original)).apply()
    ref = weakref.ref(pool)
    del pool
    gc.collect()
    assert ref() is None and patch.owner is None and patch.undo() is False

    class Slotted:
        __slots__ = ()

        def acquire(self) -> str:
            return "connection"

    slotted = Slotted()
    try:
        Patch(slotted, "acquire", lambda original: counting([], "ours", original)).apply()
    except AttributeError:
        pass
    else:  # pragma: no cover
        raise AssertionError("a refused assignment must raise")
    assert slotted.acquire() == "connection"


def test_a_patch_someone_else_wrapped_stays_in_their_chain_and_theirs_stays() -> None:
    owner = types.SimpleNamespace(f=lambda x: x + 1)
    calls: list[str] = []

    def make(original):  # noqa: ANN001, ANN202 - a replacement that passes through once undone
        def ours(x):  # noqa: ANN001, ANN202
            if patch.active:
                calls.append("ours")
            return original(x)
        return ours

    patch = Patch(owner, "f", make).apply()
    owner.f = counting(calls, "theirs", owner.f)  # another library, after loopwatch
    theirs = owner.f
    assert owner.f(1) == 2 and calls == ["theirs", "ours"]
    assert patch.undo() is False  # not ours on top: theirs stays
    assert owner.f is theirs
    calls.clear()
    assert owner.f(1) == 2 and calls == ["theirs"]  # ours passes through


def test_a_class_attribute_is_restored_as_it_was_or_removed_if_it_was_inherited() -> None:
    class Base:
        def m(self) -> str:
            return "base"

    class Child(Base):
        pass

    patch = Patch(Child, "m", lambda original: lambda self: "ours:" + original(self)).apply()
    assert Child().m() == "ours:base" and "m" in vars(Child)
    patch.undo()
    assert "m" not in vars(Child) and Child().m() == "base"


# -- the global patch sites, with another library on top ------------------------------------------------

def test_handle_run_wrapped_by_another_library_after_loopwatch_keeps_both_working(tmp_path: Path) -> None:
    calls: list[str] = []
    loopwatch.install(registry=CollectorRegistry(), metrics_port=0, dump_dir=tmp_path,
                      slow_callback_mode="exact", slow_callback_threshold=0.05)

    async def work() -> None:
        await asyncio.sleep(0)
        time.sleep(0.08)  # a slow callback loopwatch must still time exactly, through their wrapper
        await asyncio.sleep(0)

    theirs = None
    try:
        async def main() -> None:
            nonlocal theirs
            assert events.Handle._run is not ORIGINAL_RUN  # exact mode: ours
            theirs = counting(calls, "theirs", events.Handle._run)
            events.Handle._run = theirs  # the other library
            await asyncio.create_task(work(), name="slowpoke")

        with capture_logs() as logs:
            asyncio.run(main())
        assert calls, "their wrapper ran"
        slow = [e for e in logs if e["event"] == "loopwatch.slow_callback"]
        assert [e["callback"].rsplit(".", 1)[-1] for e in slow] == ["work"], slow  # ours timed it, under theirs
        assert slow[0]["what"] == "task_step" and slow[0]["duration"] >= 0.08
    finally:
        loopwatch.uninstall()
    try:
        assert events.Handle._run is theirs  # theirs stays
        calls.clear()
        asyncio.run(work())
        assert calls  # and works, with ours passing through beneath it
    finally:
        events.Handle._run = ORIGINAL_RUN
    # Their library removed itself (asyncio's own is back): exact timing wraps again, and unwraps.
    loopwatch.install(registry=CollectorRegistry(), metrics_port=0, dump_dir=tmp_path, slow_callback_mode="exact")

    async def current() -> object:
        return events.Handle.__dict__["_run"]

    try:
        assert asyncio.run(current()) is not ORIGINAL_RUN
    finally:
        loopwatch.uninstall()
    assert events.Handle.__dict__["_run"] is ORIGINAL_RUN


def test_set_running_loop_wrapped_by_another_library_before_and_after_uninstall(tmp_path: Path) -> None:
    calls: list[str] = []
    agent = loopwatch.install(registry=CollectorRegistry(), metrics_port=0, dump_dir=tmp_path)
    theirs = counting(calls, "theirs", events._set_running_loop)
    events._set_running_loop = theirs
    try:
        async def probes() -> int:  # the loop was attached by the hook, not by an install() inside it
            return len(agent.loops())

        assert asyncio.run(probes()) == 1  # loopwatch still saw the loop start, through theirs
        assert calls
        loopwatch.uninstall()
        assert events._set_running_loop is theirs  # theirs stays
        calls.clear()
        assert asyncio.run(asyncio.sleep(0, "ok")) == "ok" and calls  # both still work, ours passes through
        # Installed again: ours (still in their chain) reports loops again, without being stacked twice.
        agent = loopwatch.install(registry=CollectorRegistry(), metrics_port=0, dump_dir=tmp_path)
        assert asyncio.run(probes()) == 1
        assert events._set_running_loop is theirs
        loopwatch.uninstall()
    finally:
        events._set_running_loop = ORIGINAL_SET_RUNNING_LOOP
        asyncio._set_running_loop = ORIGINAL_SET_RUNNING_LOOP
    # Their library removed itself (asyncio's own is back): the next install patches again.
    loopwatch.install(registry=CollectorRegistry(), metrics_port=0, dump_dir=tmp_path)
    try:
        assert events._set_running_loop is not ORIGINAL_SET_RUNNING_LOOP
    finally:
        loopwatch.uninstall()
    assert events._set_running_loop is ORIGINAL_SET_RUNNING_LOOP


# -- the instance-level patch sites, with another library on top ----------------------------------------

def test_instance_sites_wrapped_by_another_library_after_loopwatch_keep_both_working(tmp_path: Path) -> None:
    """A loop's exception handler, its run_in_executor and its selector's select; a watched executor's
    submit and a watched Redis pool's get_connection and release: another library wraps each after
    loopwatch.  Before uninstall() both count; after it, theirs stays in place and works, ours passes through."""
    import concurrent.futures

    import redis

    from conftest import collected, sample

    registry = CollectorRegistry()
    calls: list[str] = []
    pool = redis.ConnectionPool(host="127.0.0.1", port=6379)
    client = redis.Redis(connection_pool=pool)
    executor = concurrent.futures.ThreadPoolExecutor(2)
    sites: list[tuple[object, str]] = []

    def wrap_theirs(owner: object, name: str) -> None:
        setattr(owner, name, counting(calls, f"theirs:{name}", getattr(owner, name)))
        sites.append((owner, name))

    def boom() -> None:
        raise ValueError("boom")

    async def use(loop: asyncio.AbstractEventLoop) -> None:
        loop.call_soon(boom)
        await asyncio.sleep(0.01)
        await loop.run_in_executor(None, time.sleep, 0)
        await asyncio.wrap_future(executor.submit(time.sleep, 0))
        assert client.ping()

    async def main() -> dict[str, object]:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(lambda _loop, _context: None)
        loopwatch.install(registry=registry, metrics_port=0, dump_dir=tmp_path)
        loopwatch.watch_executor(executor, "work")
        loopwatch.watch_pool(pool, "cache")
        for owner, name in ((loop, "call_exception_handler"), (loop, "run_in_executor"),
                            (loop._selector, "select"), (executor, "submit"), (pool, "get_connection"),  # type: ignore[attr-defined]
                            (pool, "release")):
            wrap_theirs(owner, name)
        await use(loop)
        ours = collected(registry)
        theirs_before = sorted(set(calls))
        loopwatch.uninstall()
        assert all(getattr(owner, name) is vars(owner)[name] for owner, name in sites)
        placed = [getattr(owner, name).__name__ for owner, name in sites]
        calls.clear()
        await use(loop)  # after uninstall(): theirs still works, through ours passing through
        return {"ours": ours, "theirs_before": theirs_before, "theirs_after": sorted(set(calls)), "placed": placed}

    try:
        result = asyncio.run(main())
    finally:
        executor.shutdown()
        pool.disconnect()
    ours = result["ours"]
    assert sample(ours, "loopwatch_task_exceptions_total", exception="ValueError") == 1
    assert sample(ours, "loopwatch_to_thread_executor_queue_wait_seconds_count", executor="default") == 1
    assert sample(ours, "loopwatch_to_thread_executor_queue_wait_seconds_count", executor="work") == 1
    assert sample(ours, "loopwatch_db_client_connection_use_time_seconds_count", pool_name="cache") == 1
    expected = sorted(f"theirs:{name}" for name in ("call_exception_handler", "run_in_executor", "select", "submit",
                                                   "get_connection", "release"))
    assert result["theirs_before"] == expected and result["theirs_after"] == expected
    assert result["placed"] == ["wrapper"] * len(expected), "theirs stays on top of each site"
