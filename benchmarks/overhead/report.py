"""The table: the headline (the three figures the defaults are judged on), then each figure's section."""

from __future__ import annotations

from typing import Any

from .callgrind import _render_callgrind
from .harness import TARGET_IDLE_MS, TARGET_ONE_CALLBACK, TARGET_STEP_RATIO, _verdict
from .hooks import _render_hooks
from .http_wrk import _render_http
from .http_callgrind import _render_http_callgrind
from .idle import _render_idle
from .scrape import _render_scrape
from .wall import _render_wall


def _render_headline(result: dict[str, Any], add: Any) -> None:
    """The three figures the defaults are judged on, without and with loopwatch, side by side."""
    add("Headline: the cost of loopwatch's defaults, measured side by side in this run")
    add(f"   {'':62}{'without':>12}{'with':>12}{'cost':>10}   target")
    cg = result.get("callgrind")
    if isinstance(cg, dict) and "ratio" in cg:
        add(f"   {'100 ready task steps per iteration (callgrind instructions/step)':62}"
            f"{cg['without_per_step']:12,.0f}{cg['with_per_step']:12,.0f}{100 * (cg['ratio'] - 1):+9.2f}%"
            f"   <= +{100 * (TARGET_STEP_RATIO - 1):.0f}%: {_verdict(cg['ratio'] <= TARGET_STEP_RATIO)}")
    else:
        add(f"   100 ready task steps per iteration: not measured ({cg})")
    hooks = result.get("hooks")
    hcg = hooks.get("callgrind") if isinstance(hooks, dict) else None
    if isinstance(hcg, dict):
        for variant, label in (("auto", "one trivial callback per iteration (instructions/callback)"),
                               ("auto-py", "  the same, pure Python (no C accelerator)"),
                               ("timer", "  (no loopwatch, one pending asyncio timer)")):
            base, value = hcg["per_callback"]["none"]["1"], hcg["per_callback"][variant]["1"]
            cost = value / base - 1
            verdict = (_verdict(cost <= TARGET_ONE_CALLBACK) if variant == "auto" else
                       "(fallback)" if variant == "auto-py" else "(reference: any app with a pending timer)")
            add(f"   {label:62}{base:12,.0f}{value:12,.0f}{100 * cost:+9.2f}%"
                f"   <= +{100 * TARGET_ONE_CALLBACK:.0f}% (goal +2%): {verdict}")
    else:
        add(f"   one trivial callback per iteration: not measured ({hcg})")
    idle = result.get("idle")
    if isinstance(idle, dict):
        with_ms = idle["with"]["cpu_ms_per_s"]
        add(f"   {'idle app scraped once a second (CPU ms per second)':62}{idle['without']['cpu_ms_per_s']:12.2f}"
            f"{with_ms:12.2f}{idle['delta_ms_per_s']:+9.2f}    <= {TARGET_IDLE_MS:.0f} ms/s (goal 2): "
            f"{_verdict(with_ms <= TARGET_IDLE_MS)}")
    else:
        add(f"   idle app scraped once a second: not measured ({idle})")


def render(result: dict[str, Any]) -> str:
    lines = []
    add = lines.append
    env = result["environment"]
    add(f"loopwatch overhead benchmark ({result['mode']})  loopwatch {env['loopwatch']}  "
        f"python {env['python']}  {env['cpus']} CPUs  load {env['load_before'][0]:.2f} -> {env['load_after'][0]:.2f}")
    rule = "=" * 100
    add(rule)
    _render_headline(result, add)
    add(rule)

    _render_wall(result.get("wall"), add)
    add("")
    _render_callgrind(result.get("callgrind"), add)
    add("")
    _render_idle(result.get("idle"), add)
    add("")
    _render_hooks(result.get("hooks"), add)
    add("")
    _render_http(result.get("http"), add)
    add("")
    _render_http_callgrind(result.get("httpcg"), add, result.get("http"))
    add("")
    _render_scrape(result.get("scrape"), add)
    add(rule)
    sections = ", ".join(f"{k} {v:.0f}" for k, v in result.get("section_s", {}).items())
    add(f"total {result['elapsed_s']:.0f} s{f' ({sections})' if sections else ''}; "
        f"JSON: {result.get('json_path', '-')}")
    return "\n".join(lines)
