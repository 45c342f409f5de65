"""A fork taken while the loop thread holds any of loopwatch's locks never hangs the child (issue: "fork
handling is per component ... including module-level locks and histogram locks").  Every lock loopwatch
creates comes from ``_forksafe`` (checked on the source), and the child finds every one of them free."""

from __future__ import annotations

import asyncio
import os
import re
import threading
import time
import warnings
from pathlib import Path

from prometheus_client import CollectorRegistry

import loopwatch
from loopwatch import _forksafe, _slow

PACKAGE = Path(loopwatch.__file__).parent


def test_every_lock_in_the_package_comes_from_forksafe() -> None:
    direct = re.compile(r"\bthreading\.R?Lock\(|\b_thread\.allocate_lock\(|\bfrom threading import .*\bR?Lock\b")
    found = [f"{path.name}:{n}" for path in sorted(PACKAGE.glob("*.py")) if path.name != "_forksafe.py"
             for n, line in enumerate(path.read_text().splitlines(), 1) if direct.search(line)]
    assert found == [], f"locks that a fork could leave held in the child: {found}"


def test_the_child_finds_every_lock_free_when_the_loop_thread_held_them_all_at_fork(tmp_path: Path) -> None:
    registry = CollectorRegistry()
    outcome: dict[str, object] = {}

    async def main() -> None:
        agent = loopwatch.install(registry=registry, metrics_port=0, dump_dir=tmp_path, slow_callback_mode="exact")
        await asyncio.sleep(0.05)
        locks = _forksafe.tracked()
        assert _slow._exact_lock in locks and agent.lag.delay._lock in locks  # module-level, histogram
        assert len(locks) >= 15, len(locks)
        forked = threading.Event()

        def fork_from_another_thread() -> None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # 3.12+: fork() in a threaded process
                pid = os.fork()
            if pid == 0:  # the child: only this thread exists; every lock must be free
                code = 0
                try:
                    for held in _forksafe.tracked():
                        if not held.acquire(timeout=2.0):
                            code = 3
                            break
                        held.release()
                    list(registry.collect())  # a scrape in the child: every collector's locks
                    loopwatch.uninstall()
                except BaseException:  # noqa: BLE001
                    code = 4
                os._exit(code)
            outcome["pid"] = pid
            forked.set()

        for held in locks:  # the loop thread holds every one of them across the fork
            held.acquire()
        try:
            thread = threading.Thread(target=fork_from_another_thread)
            thread.start()
            assert forked.wait(30), "fork() did not return in the parent"
            thread.join()
        finally:
            for held in reversed(locks):
                held.release()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            pid, status = os.waitpid(outcome["pid"], os.WNOHANG)  # type: ignore[arg-type]
            if pid:
                outcome["status"] = os.waitstatus_to_exitcode(status)
                return
            await asyncio.sleep(0.05)
        os.kill(outcome["pid"], 9)  # type: ignore[arg-type]
        os.waitpid(outcome["pid"], 0)  # type: ignore[arg-type]
        outcome["status"] = "hung"

    asyncio.run(main())
    loopwatch.uninstall()
    assert outcome["status"] == 0, f"the child {outcome['status']} (3: a lock still held, 4: an error, hung)"
