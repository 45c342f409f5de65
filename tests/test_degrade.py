"""Fault degradation: loopwatch never raises into the host when a feature cannot work (port taken,
dump_dir unwritable at install or broken at runtime); it says so, counts it, and keeps measuring.
Plus manual dumps."""

from __future__ import annotations

import asyncio
import inspect
import json
import shutil
import socket
import stat
import threading
import time

import prometheus_client
import pytest
import structlog
from conftest import collected, sample

import loopwatch

STALL_OPTIONS = {"lag_thresholds": (0.3,), "dump_cooldown": 0, "probe_interval": 0.25}


def events(logs: list[dict], name: str) -> list[dict]:
    return [e for e in logs if e["event"] == name]


async def stalling_main(check=None):
    """Healthy beats, a 0.8 s blocking call, then enough healthy time for the stall to be logged."""
    await asyncio.sleep(0.3)
    time.sleep(0.8)
    await asyncio.sleep(0.5)
    return check() if check is not None else None


# -- 5. the metrics port is taken -------------------------------------------------------------------
def test_port_taken_degrades_exporter_only(registry, tmp_path):
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        with structlog.testing.capture_logs() as logs:
            agent = loopwatch.install(registry=registry, metrics_port=port, metrics_addr="127.0.0.1",
                                      dump_dir=tmp_path, probe_interval=0.25)
        assert agent.started
        assert agent.metrics_url is None
        degraded = agent.snapshot().degraded
        assert len(degraded) == 1, degraded
        assert "exporter" in degraded[0] and str(port) in degraded[0], degraded
        assert sample(collected(registry), "loopwatch_errors_total", component="exporter") == 1.0
        found = events(logs, "loopwatch.degraded")
        assert len(found) == 1, logs
        assert found[0]["feature"] == "exporter"
        assert f"127.0.0.1:{port}" in found[0]["reason"]
        assert found[0]["log_level"] == "warning"
        assert not [t for t in threading.enumerate() if t.name == "loopwatch-exporter"]

        async def main():
            await asyncio.sleep(0.8)
            return collected(registry)

        samples = asyncio.run(main())
    # metrics are still collected in the registry while the loop runs
    assert sample(samples, "loopwatch_event_loop_lag_seconds", loop="main") is not None
    assert sample(samples, "loopwatch_event_loop_delay_seconds_count", loop="main") >= 2
    assert sample(samples, "loopwatch_event_loop_lag_spikes_total", loop="main", threshold="0.5") == 0.0
    assert sample(samples, "loopwatch_errors_total", component="exporter") == 1.0
    assert agent.snapshot().dumps_enabled


# -- 6. dump_dir unwritable at install --------------------------------------------------------------
def test_unwritable_dump_dir_disables_dumps_only(registry, tmp_path):
    (tmp_path / "file").write_text("not a directory\n")
    dump_dir = tmp_path / "file" / "dumps"  # root can write anywhere, but not below a regular file
    with structlog.testing.capture_logs() as logs:
        agent = loopwatch.install(registry=registry, metrics_port=0, dump_dir=dump_dir, **STALL_OPTIONS)
    snapshot = agent.snapshot()
    assert agent.started
    assert snapshot.dumps_enabled is False
    assert any(str(dump_dir) in entry for entry in snapshot.degraded), snapshot.degraded
    found = events(logs, "loopwatch.degraded")
    assert len(found) == 1, logs
    reason = found[0]["reason"]
    assert "dump_dir" in reason and str(dump_dir) in reason, reason
    assert "not a directory" in reason.lower(), reason  # why, not only that

    with pytest.raises(RuntimeError) as info:
        loopwatch.dump()
    assert "not a directory" in str(info.value).lower() and str(dump_dir) in str(info.value)

    def spikes():
        return sample(collected(registry), "loopwatch_event_loop_lag_spikes_total", loop="main", threshold="0.3")

    with structlog.testing.capture_logs() as logs:
        assert asyncio.run(stalling_main(spikes)) == 1.0
    stalls = events(logs, "loopwatch.stall")
    assert len(stalls) == 1, logs
    assert "dump" not in stalls[0]
    assert "dumps disabled" in stalls[0]["note"]
    assert not events(logs, "loopwatch.error"), logs
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]
    assert sample(collected(registry), "loopwatch_dumps_total", reason="event_loop_lag") == 0.0


# -- 7. dump_dir broken at runtime ------------------------------------------------------------------
@pytest.mark.parametrize("faulthandler", [True, False])
def test_dump_dir_broken_at_runtime(registry, tmp_path, faulthandler):
    dump_dir = tmp_path / "dumps"
    agent = loopwatch.install(registry=registry, metrics_port=0, dump_dir=dump_dir,
                              faulthandler=faulthandler, **STALL_OPTIONS)
    assert agent.snapshot().dumps_enabled
    shutil.rmtree(dump_dir)
    dump_dir.write_text("someone replaced the directory by a file\n")

    async def main():
        samples_after_stall = await stalling_main(lambda: collected(registry))
        for _ in range(4):  # the app goes on: the loop keeps turning and the probe keeps beating
            await asyncio.sleep(0.1)
        return samples_after_stall, collected(registry), "app finished"

    with structlog.testing.capture_logs() as logs:
        during, after, result = asyncio.run(main())
    assert result == "app finished"
    assert sample(during, "loopwatch_errors_total", component="dump") >= 1.0
    assert sample(during, "loopwatch_event_loop_lag_spikes_total", loop="main", threshold="0.3") == 1.0
    assert sample(during, "loopwatch_dumps_total", reason="event_loop_lag") == 0.0
    assert (sample(after, "loopwatch_event_loop_delay_seconds_count", loop="main")
            > sample(during, "loopwatch_event_loop_delay_seconds_count", loop="main"))
    errors = [e for e in events(logs, "loopwatch.error") if e["component"] == "dump"]
    assert errors, logs
    assert errors[0]["log_level"] == "error"
    assert "NotADirectoryError" in errors[0]["error"]
    assert dump_dir.read_text() == "someone replaced the directory by a file\n"  # we did not "fix" it


def test_stall_still_logged_when_dump_dir_broken_at_runtime(registry, tmp_path):
    dump_dir = tmp_path / "dumps"
    loopwatch.install(registry=registry, metrics_port=0, dump_dir=dump_dir, faulthandler=True,
                      **STALL_OPTIONS)
    shutil.rmtree(dump_dir)
    dump_dir.write_text("")
    with structlog.testing.capture_logs() as logs:
        samples = asyncio.run(stalling_main(lambda: collected(registry)))
    assert sample(samples, "loopwatch_errors_total", component="watchdog") == 0.0
    (stall,) = events(logs, "loopwatch.stall")
    assert "could not be written" in stall["note"]
    assert stall["culprit"], stall  # the stack was taken even though it could not be written


# -- 8. manual dumps --------------------------------------------------------------------------------
def test_manual_dump_from_inside_the_loop(registry, tmp_path):
    loopwatch.install(registry=registry, metrics_port=0, dump_dir=tmp_path)

    async def main():
        await asyncio.sleep(0.3)
        line = inspect.currentframe().f_lineno + 1
        path = loopwatch.dump()
        return line, path, collected(registry)

    with structlog.testing.capture_logs() as logs:
        line, path, samples = asyncio.run(main())
    assert path.parent == tmp_path
    assert path.suffix == ".json" and path.name.endswith("-manual.json"), path.name
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    twin = path.with_suffix(".txt")
    assert twin.exists() and stat.S_IMODE(twin.stat().st_mode) == 0o600
    dump = json.loads(path.read_text())
    assert dump["reason"] == "manual"
    assert dump["source"] == "manual"
    assert dump["loop"] == "main"
    assert dump["culprit"]["filename"] == __file__
    assert dump["culprit"]["lineno"] == line
    assert dump["culprit"]["function"].endswith("main")
    assert dump["culprit"]["line"] == "path = loopwatch.dump()"
    assert dump["loop_stack"][-1]["filename"] != __file__  # loopwatch frames are in the stack, not the culprit
    assert sample(samples, "loopwatch_dumps_total", reason="manual") == 1.0
    assert sample(samples, "loopwatch_dumps_total", reason="event_loop_lag") == 0.0
    logged = events(logs, "loopwatch.dump")
    assert len(logged) == 1 and logged[0]["path"] == str(path) and logged[0]["reason"] == "manual"


def test_manual_dump_reason_is_sanitized(registry, tmp_path):
    loopwatch.install(registry=registry, metrics_port=0, dump_dir=tmp_path)
    path = loopwatch.dump("Weird Reason!")
    assert path.name.endswith("-weird_reason.json"), path.name
    assert json.loads(path.read_text())["reason"] == "weird_reason"
    assert sample(collected(registry), "loopwatch_dumps_total", reason="weird_reason") == 1.0
    assert sample(collected(registry), "loopwatch_dumps_total", reason="manual") == 0.0
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
