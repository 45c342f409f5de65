"""``python -m loopwatch``: tools around the agent.

    python -m loopwatch dashboards [--namespace NS] [--out DIR]

writes the Grafana dashboard (``NS.json``), the Prometheus recording and alerting rules
(``NS-rules.yml``) and provisioning examples for the metric namespace ``NS`` (the ``namespace`` option
of ``loopwatch.install()``), so a team whose metrics are ``oraculo_*`` gets ``oraculo_*`` dashboards.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ._config import resolve
from ._dashboards import DEFAULT_NAMESPACE, RUNBOOK, render
from ._errors import ConfigError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loopwatch", description="Tools around the loopwatch agent.")
    commands = parser.add_subparsers(dest="command", required=True)
    dashboards = commands.add_parser("dashboards", help="write the Grafana dashboard and Prometheus rules for a namespace")
    dashboards.add_argument("--namespace", default=DEFAULT_NAMESPACE,
                            help=f"metric name prefix, as given to install() (default {DEFAULT_NAMESPACE})")
    dashboards.add_argument("--out", default=".", help="directory to write into (created if missing; default .)")
    dashboards.add_argument("--runbook-url", default=RUNBOOK,
                            help="where your copy of dashboards/RUNBOOK.md is served; each alert's runbook_url "
                                 "is this plus '#<alertname in lower case>' (default: the project's)")
    args = parser.parse_args(argv)
    try:
        namespace = resolve({"namespace": args.namespace}, environ={}).namespace
    except ConfigError as exc:
        parser.error(str(exc))
    for path in render(namespace, Path(args.out), args.runbook_url):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
