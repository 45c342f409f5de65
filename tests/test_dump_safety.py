"""Dump files are safe (issue 12): a per-user default directory, a directory another user controls is
refused, every file is created without following a link, and in-flight files carry the host, so that
pods sharing a dump volume (both pid 1) never take each other's for a dead process's.  Each attack is
tried for real (as root: the tests hand directories and links to the ``nobody`` user)."""

from __future__ import annotations

import os
from pathlib import Path

import psutil
import pytest
from prometheus_client import CollectorRegistry

import loopwatch
from loopwatch._config import resolve
from loopwatch._gilheld import host_id, inflight_name

NOBODY = 65534
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="handing files to another user needs root")


def install(dump_dir: Path, **options: object) -> loopwatch.Agent:
    return loopwatch.install(registry=CollectorRegistry(), metrics_port=0, dump_dir=dump_dir, **options)


def test_the_default_dump_dir_is_per_user() -> None:
    default = resolve({}, environ={}).dump_dir
    assert default.name == f"loopwatch-{os.getuid()}"


@as_root
def test_a_world_writable_directory_of_another_user_is_refused_with_a_reason(tmp_path: Path) -> None:
    theirs = tmp_path / "shared"
    theirs.mkdir()
    os.chown(theirs, NOBODY, NOBODY)
    theirs.chmod(0o777)
    agent = install(theirs)
    try:
        snapshot = agent.snapshot()
        assert not snapshot.dumps_enabled
        assert any(note.startswith("dumps:") and "writable by other users" in note and "uid 65534" in note
                   for note in snapshot.degraded), snapshot.degraded
        assert list(theirs.iterdir()) == [], "nothing written there, not even the in-flight file"
        with pytest.raises(RuntimeError, match="writable by other users"):
            loopwatch.dump()
        registry = agent.options.registry  # the rest keeps working: the series are there
        assert registry.get_sample_value("loopwatch_dumps_total", {"service": agent.options.service,
                                                                   "reason": "manual"}) == 0
    finally:
        loopwatch.uninstall()


@as_root
def test_a_link_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "somewhere"
    target.mkdir(mode=0o700)
    link = tmp_path / "dumps"
    link.symlink_to(target)
    os.lchown(link, NOBODY, NOBODY)
    agent = install(link)
    try:
        assert not agent.snapshot().dumps_enabled
        assert any("symbolic link owned by another user" in note for note in agent.snapshot().degraded)
        assert list(target.iterdir()) == []
    finally:
        loopwatch.uninstall()


def test_a_link_planted_at_the_guessable_in_flight_name_is_not_followed(tmp_path: Path) -> None:
    """The in-flight file's name is built from the pid and the start time (both in /proc) and the host:
    another user can guess it and plant a link there before install().  loopwatch must not write through it."""
    victim = tmp_path / "precious.txt"
    victim.write_text("do not touch\n")
    created_ms = int(psutil.Process().create_time() * 1000)
    planted = tmp_path / inflight_name(os.getpid(), created_ms, host_id())
    planted.symlink_to(victim)
    agent = install(tmp_path)
    try:
        assert agent.fallback.path == planted and agent.fallback.stacks is not None
        assert not planted.is_symlink() and planted.is_file()
        assert (planted.stat().st_mode & 0o777) == 0o600
        assert victim.read_text() == "do not touch\n"
    finally:
        loopwatch.uninstall()
    assert victim.read_text() == "do not touch\n"


def test_another_hosts_in_flight_file_on_a_shared_volume_is_left_alone(tmp_path: Path) -> None:
    """Two pods share the dump volume, both pid 1: the other pod's live in-flight file is not a dead
    process's leftover here (its pid means nothing on this host), while this host's dead one is converted."""
    stack = 'Stack (most recent call first):\n  File "/app/handler.py", line 7 in handle\n'
    other = tmp_path / "loopwatch-inflight-1-1700000000000-other-pod-7f9c.txt"
    other.write_text(f"# loopwatch in-flight pid=1 created=1700000000000 loop_thread=none host=other-pod-7f9c "
                     f"service=api\n{stack}")
    mine_dead = tmp_path / f"loopwatch-inflight-999999-1700000000000-{host_id()}.txt"
    mine_dead.write_text(f"# loopwatch in-flight pid=999999 created=1700000000000 loop_thread=none "
                         f"host={host_id()} service=api\n{stack}")
    install(tmp_path)
    loopwatch.uninstall()
    assert other.exists() and other.read_text().endswith(stack), "the other pod's file is untouched"
    assert not mine_dead.exists()
    (converted,) = tmp_path.glob("loopwatch-*-unfinished_stall.json")
    assert '"hostname": "' + host_id() + '"' in converted.read_text()
