"""``loopwatch report`` as a browser draws it: real dumps, a real headless Chromium, what is on the screen.

A small service (tests/data/incidents/stalls_app.py) blocks its loop for real with loopwatch installed --
``time.sleep`` (kind ``blocked``), a busy loop (kind ``cpu``), a regex that holds the GIL (kind ``cpu``, the
loop thread's own stack) -- and ``python -m loopwatch report`` turns its dump directory into a page.
Debian's ``chromium`` (installed by ``tools/system-packages test``; a missing browser fails these tests)
renders it headless: the screenshot, decoded here (PNG in pure Python), must show each kind's colour inside
the timeline's plotting area, and the DOM after rendering must rank the culprits in the order their dumps'
stalled seconds give and show each one's line, task and threads.  A hostile dump must stay text.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from collections import defaultdict
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from loopwatch._dumps import DumpWriter, build_dump
from loopwatch._incidents import KIND_COLOURS, PLOT_BACKGROUND

ROOT = Path(__file__).resolve().parent.parent
STALLS_APP = ROOT / "tests" / "data" / "incidents" / "stalls_app.py"
CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--hide-scrollbars", "--force-color-profile=srgb", "--force-device-scale-factor=1"]
WINDOW = (1024, 1000)
FUNCTIONS = {"read_config": "BLOCKED-LINE", "score_signals": "CPU-LINE", "match_symbol": "GIL-LINE"}


# -- the browser and its output -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def chromium() -> str:
    found = CHROMIUM if os.access(CHROMIUM, os.X_OK) else shutil.which("chromium")
    assert found, (f"{CHROMIUM} not found: the report's browser test needs Debian's chromium package; "
                   f"run `tools/system-packages test` (as root) or `make test`")
    return found


def browse(chromium: str, page: Path, workdir: Path, *extra: str) -> subprocess.CompletedProcess[bytes]:
    profile = workdir / f"chromium-profile-{len(list(workdir.glob('chromium-profile-*')))}"
    result = subprocess.run([chromium, *FLAGS, f"--user-data-dir={profile}", *extra, page.as_uri()],
                            capture_output=True, timeout=180, cwd=workdir)
    assert result.returncode == 0, result.stderr.decode(errors="replace")[-2000:]
    return result


def screenshot(chromium: str, page: Path, workdir: Path) -> tuple[int, int, int, bytearray]:
    png = workdir / f"{page.stem}.png"
    browse(chromium, page, workdir, f"--screenshot={png}", f"--window-size={WINDOW[0]},{WINDOW[1]}")
    assert png.is_file(), f"chromium wrote no screenshot of {page}"
    return decode_png(png.read_bytes())


def dom(chromium: str, page: Path, workdir: Path) -> str:
    return browse(chromium, page, workdir, "--dump-dom").stdout.decode()


def decode_png(data: bytes) -> tuple[int, int, int, bytearray]:
    """``(width, height, bytes per pixel, pixels)`` of an 8-bit RGB/RGBA, non-interlaced PNG."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, chunks = 8, []
    width = height = bpp = 0
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        pos += 12 + length
        if kind == b"IHDR":
            width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", body)
            assert depth == 8 and colour in (2, 6) and interlace == 0, (depth, colour, interlace)
            bpp = 3 if colour == 2 else 4
        elif kind == b"IDAT":
            chunks.append(body)
        elif kind == b"IEND":
            break
    raw = zlib.decompress(b"".join(chunks))
    stride = width * bpp
    pixels = bytearray(height * stride)
    prev = bytearray(stride)
    for y in range(height):
        start = y * (stride + 1)
        kind, line = raw[start], bytearray(raw[start + 1:start + 1 + stride])
        if kind == 1:
            for i in range(bpp, stride):
                line[i] = (line[i] + line[i - bpp]) & 0xFF
        elif kind == 2:
            line = bytearray((a + b) & 0xFF for a, b in zip(line, prev))
        elif kind == 3:
            for i in range(stride):
                left = line[i - bpp] if i >= bpp else 0
                line[i] = (line[i] + ((left + prev[i]) >> 1)) & 0xFF
        elif kind == 4:
            for i in range(stride):
                a = line[i - bpp] if i >= bpp else 0
                b, c = prev[i], (prev[i - bpp] if i >= bpp else 0)
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 0xFF
        pixels[y * stride:(y + 1) * stride] = line
        prev = line
    return width, height, bpp, pixels


def rgb(colour: str) -> tuple[int, int, int]:
    return int(colour[1:3], 16), int(colour[3:5], 16), int(colour[5:7], 16)


def box_of(image: tuple[int, int, int, bytearray], colour: str) -> tuple[int, int, int, int]:
    """The bounding box (x0, y0, x1, y1) of the pixels of exactly ``colour``."""
    width, height, bpp, pixels = image
    want = bytes(rgb(colour))
    xs, ys = [], []
    for y in range(height):
        row = pixels[y * width * bpp:(y + 1) * width * bpp]
        at = row.find(want)
        while at >= 0:
            if at % bpp == 0:
                xs.append(at // bpp)
                ys.append(y)
            at = row.find(want, at + 1)
    assert xs, f"no pixel of {colour} on the screen"
    return min(xs), min(ys), max(xs), max(ys)


def count_colour(image: tuple[int, int, int, bytearray], box: tuple[int, int, int, int], colour: str,
                 tolerance: int = 6) -> int:
    width, _, bpp, pixels = image
    r0, g0, b0 = rgb(colour)
    x0, y0, x1, y1 = box
    n = 0
    for y in range(y0, y1 + 1):
        for x in range(x0, x1 + 1):
            i = (y * width + x) * bpp
            if abs(pixels[i] - r0) <= tolerance and abs(pixels[i + 1] - g0) <= tolerance and \
                    abs(pixels[i + 2] - b0) <= tolerance:
                n += 1
    return n


class Dom(HTMLParser):
    """Start tags with attributes; the text of each culprit section and of the whole page."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, Any]]] = []
        self.text: list[str] = []
        self.sections: dict[int, list[str]] = defaultdict(list)
        self._section: int | None = None
        self._depth = 0
        self.title = ""
        self._in_title = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        self.tags.append((tag, found))
        self._in_title = tag == "title" and not self.title  # the page's, not an SVG tooltip's
        if tag == "section" and found.get("class") == "culprit":
            self._section, self._depth = int(found["data-rank"] or 0), 0
        if self._section is not None and tag == "section":
            self._depth += 1

    def handle_endtag(self, tag: str) -> None:
        self._in_title = False
        if self._section is not None and tag == "section":
            self._depth -= 1
            if self._depth == 0:
                self._section = None

    def handle_data(self, data: str) -> None:
        self.text.append(data)
        if self._in_title:
            self.title += data
        if self._section is not None:
            self.sections[self._section].append(data)


def parse_dom(text: str) -> Dom:
    parsed = Dom()
    parsed.feed(text)
    return parsed


# -- real dumps ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def real_dumps(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The dump directory of a service that really stalled, three ways."""
    dump_dir = tmp_path_factory.mktemp("incident") / "dumps"
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOOPWATCH_")}
    result = subprocess.run([sys.executable, str(STALLS_APP), str(dump_dir)], capture_output=True, text=True,
                            timeout=180, env=env)
    assert result.returncode == 0 and "DONE" in result.stdout, result.stdout + result.stderr
    return dump_dir


def dumps_by_function(dump_dir: Path) -> dict[str, list[dict[str, Any]]]:
    found: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for path in dump_dir.glob("loopwatch-*.json"):
        dump = json.loads(path.read_text())
        found[(dump.get("culprit") or {}).get("function")].append(dump)
    return found


def expected_ranking(dump_dir: Path) -> list[str]:
    """``file:line`` of each culprit, by total stalled seconds of its dumps (then stalls), from the files: the
    whole stall's ``duration`` where the dump has it (added when the stall ended), else ``stall_seconds``."""
    totals: dict[str, list[float]] = defaultdict(list)
    for dumps in dumps_by_function(dump_dir).values():
        for dump in dumps:
            c = dump["culprit"]
            totals[f"{c['filename']}:{c['lineno']}"].append(dump.get("duration", dump["stall_seconds"]))
    return sorted(totals, key=lambda k: (-sum(totals[k]), -len(totals[k])))


@pytest.fixture(scope="module")
def real_report(real_dumps: Path) -> Path:
    page = real_dumps.parent / "report.html"
    result = subprocess.run([sys.executable, "-m", "loopwatch", "report", str(real_dumps), "-o", str(page)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"wrote {page}: 6 stalls at 3 culprits"), result.stdout
    return page


def test_the_service_really_stalled_three_ways(real_dumps: Path) -> None:
    found = dumps_by_function(real_dumps)
    assert {f: len(d) for f, d in found.items()} == {"read_config": 3, "score_signals": 2, "match_symbol": 1}
    assert {d["kind"] for d in found["read_config"]} == {"blocked"}
    assert {d["kind"] for d in found["score_signals"]} == {"cpu"}
    assert [(d["kind"], d["source"]) for d in found["match_symbol"]] == [("cpu", "faulthandler")]


def test_the_timeline_draws_each_kind_in_its_colour(chromium: str, real_report: Path, tmp_path: Path) -> None:
    image = screenshot(chromium, real_report, tmp_path)
    assert image[:2] == WINDOW
    plot = box_of(image, PLOT_BACKGROUND)
    assert plot[2] - plot[0] > 500 and plot[3] - plot[1] > 150, f"the plotting area is not drawn: {plot}"
    # each stall is a disc of radius 6 (~100 pixels); blocked: 3 stalls, cpu: 3
    blue = count_colour(image, plot, KIND_COLOURS["blocked"])
    red = count_colour(image, plot, KIND_COLOURS["cpu"])
    green = count_colour(image, plot, KIND_COLOURS["gc"])
    assert blue >= 60, f"blocked stalls not drawn in the timeline ({blue} pixels of {KIND_COLOURS['blocked']})"
    assert red >= 60, f"cpu stalls not drawn in the timeline ({red} pixels of {KIND_COLOURS['cpu']})"
    assert green == 0, f"{green} pixels of gc's colour, but no stall was a garbage collection"


def test_the_rendered_page_ranks_the_culprits_and_shows_their_context(chromium: str, real_report: Path,
                                                                       real_dumps: Path, tmp_path: Path) -> None:
    page = parse_dom(dom(chromium, real_report, tmp_path))
    text = "".join(page.text)
    ranked = [a["data-location"] for t, a in page.tags if t == "li" and a.get("class") == "culprit-row"]
    assert [r.rsplit(" in ", 1)[0] for r in ranked] == expected_ranking(real_dumps)
    for function, marker in FUNCTIONS.items():
        (location,) = [r for r in ranked if r.endswith(f" in {function}")]
        assert location.startswith(str(STALLS_APP) + ":")
        assert location in text
        section = "".join(page.sections[ranked.index(location) + 1])
        assert f"# {marker}" in section, f"no source line of {function} in its section"
        assert "(loop thread)" in section
        if function == "match_symbol":  # the GIL was held: only the loop thread's own stack exists
            assert "GIL held" in section and "stack taken by faulthandler" in section
        else:
            assert f"running: handler-{'blocked' if function == 'read_config' else 'cpu'}" in section
            assert "loopwatch-watchdog" in section  # the other threads, as the dump holds them
    legend = {a["data-kind"] for t, a in page.tags if t == "li" and "data-kind" in a}
    assert legend == {"blocked", "cpu"}
    marks = [a for t, a in page.tags if t == "circle" and a.get("class") == "stall"]
    assert sum(int(a["data-count"]) for a in marks) == 6
    assert not [t for t, _ in page.tags if t in ("script", "img", "link", "iframe")]


def test_a_hostile_dump_stays_text_in_the_browser(chromium: str, tmp_path: Path) -> None:
    dump_dir = tmp_path / "dumps"
    dump_dir.mkdir()
    hostile = "<script>document.title='pwned'</script>"
    stack = [{"filename": '/srv/app/"><img src=x onerror="document.title=1">.py', "lineno": 1,
              "function": hostile, "line": "</pre><script>document.body.innerHTML=''</script>"}]
    dump = build_dump("event_loop_lag", service="<b>svc</b>", loop="main", stall_seconds=0.7, loop_stack=stack,
                      threads=[{"name": "<iframe>", "ident": 1, "native_id": 1, "daemon": False, "stack": stack}],
                      tasks=[{"name": "<svg onload=alert(1)>", "coro": "x", "stack": stack}], source="watchdog",
                      kind="blocked")
    DumpWriter(dump_dir, keep=10, cooldown=0).write(dump)
    page_path = tmp_path / "hostile.html"
    result = subprocess.run([sys.executable, "-m", "loopwatch", "report", str(dump_dir), "-o", str(page_path)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    page = parse_dom(dom(chromium, page_path, tmp_path))
    assert page.title == "loopwatch: 1 stall at 1 culprit"
    assert not [t for t, _ in page.tags if t in ("script", "img", "iframe")]
    assert not [a for t, a in page.tags if any(k.startswith("on") for k in a)]
    text = "".join(page.text)
    assert hostile in text and "<svg onload=alert(1)>" in text and "<b>svc</b>" in text


def test_the_example_makes_the_page_of_the_demos_dumps(chromium: str, tmp_path: Path) -> None:
    """examples/report/make_report.py: the demo, a short session of the same bot, then the two commands."""
    dump_dir = tmp_path / "dumps"
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOOPWATCH_")}
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "report" / "make_report.py"),
                             "--dump-dir", str(dump_dir)], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    page_path = tmp_path / "report.html"
    assert f"wrote {page_path}: 6 stalls at 3 culprits" in result.stdout, result.stdout
    assert "1. " in result.stdout and "xai_integration.py:31 in query_xai" in result.stdout
    page = parse_dom(dom(chromium, page_path, tmp_path))
    ranked = [a["data-location"] for t, a in page.tags if t == "li" and a.get("class") == "culprit-row"]
    assert [r.rsplit(" in ", 1)[0] for r in ranked] == expected_ranking(dump_dir)
    assert {r.rsplit(" in ", 1)[1] for r in ranked} == {"query_xai", "rescore_book", "valid_symbol"}
    text = "".join(page.sections[ranked.index(next(r for r in ranked if r.endswith("query_xai"))) + 1])
    assert "urllib.request.urlopen" in text and "running: signal-worker" in text
