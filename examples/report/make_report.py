"""The incident page on the demo's dumps: run the demo and a short trading session, then ``loopwatch report``.

    python examples/report/make_report.py [--dump-dir DIR] [--out FILE.html]

1. ``examples/demo.py --dump-dir DIR``: the bot's blocking AI call, caught mid-stall (one dump);
2. ``examples/report/shift.py DIR``: the same bot for a few more seconds -- the blocking call again, CPU-bound
   re-scoring on the loop, a regex that holds the GIL (five more dumps);
3. ``loopwatch dumps DIR`` (printed) and ``loopwatch report DIR -o FILE.html`` -- as an operator runs them.

Open the page in any browser: it loads nothing from the network.  Exits with the first failing step's status.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
EXAMPLES = HERE.parent


def step(title: str, command: list[str], *, quiet: bool = False) -> int:
    shown = ["python", *command[1:]] if command[0] == sys.executable else command
    print(f"\n$ {' '.join(shown)}    # {title}", flush=True)
    result = subprocess.run(command, stdout=subprocess.PIPE if quiet else None,
                            stderr=subprocess.STDOUT if quiet else None, text=True)
    if result.returncode != 0:
        print(f"{result.stdout or ''}FAIL: {title} exited {result.returncode}", file=sys.stderr)
    return result.returncode


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dump-dir", type=Path, help="where the dumps go (default: a new temp dir)")
    parser.add_argument("--out", type=Path, help="the page (default: report.html next to the dump dir)")
    args = parser.parse_args()
    dump_dir = args.dump_dir or Path(tempfile.mkdtemp(prefix="loopwatch-report-")) / "dumps"
    out = args.out or dump_dir.parent / "report.html"
    loopwatch = [sys.executable, "-m", "loopwatch"]
    return (step("the demo: one blocking call, dumped mid-stall (output hidden)",
                 [sys.executable, str(EXAMPLES / "demo.py"), "--dump-dir", str(dump_dir)], quiet=True)
            or step("a short trading session with three kinds of stall (output hidden)",
                    [sys.executable, str(HERE / "shift.py"), str(dump_dir)], quiet=True)
            or step("the stalls, grouped by culprit", [*loopwatch, "dumps", str(dump_dir)])
            or step("the incident page", [*loopwatch, "report", str(dump_dir), "-o", str(out)]))


if __name__ == "__main__":
    sys.exit(main())
