"""``examples/traced_request.py`` runs as its docstring says: the blocking checkout is one stall whose dump
names the line, the route and the trace the SDK exported for that request; the fixed one is no stall; the
card token is written nowhere."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_traced_request_example(tmp_path: Path) -> None:
    run = subprocess.run([sys.executable, str(ROOT / "examples" / "traced_request.py"), str(tmp_path / "dumps")],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    out = run.stdout
    assert "stall dumps: 1\n" in out, out
    assert re.search(r"culprit   traced_request\.py:\d+ in charge_card: time\.sleep\(0\.8\)", out), out
    assert re.search(r"lasted    0\.[89]\d s \(blocked\)", out), out
    assert "request   POST /checkout/{cart_id}  route /checkout/{cart_id}" in out
    dumped = re.search(r"trace_id  ([0-9a-f]{32})", out).group(1)
    exported = dict(re.findall(r"exported span (\S+): trace_id ([0-9a-f]{32})", out))
    assert exported.keys() == {"/checkout/{cart_id}", "/checkout-fixed/{cart_id}"}
    assert dumped == exported["/checkout/{cart_id}"]
    assert "context   {'customer': 'acme-42', 'request_id': 'req-1001'}  not shown: ['card_token']" in out
    assert "card_token written anywhere: False" in out
    assert "tok_live" not in run.stderr  # nor in loopwatch's events
