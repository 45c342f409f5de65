"""``loopwatch`` (the console script) and ``python -m loopwatch``: the operator's tools around the agent.

    loopwatch run [OPTIONS] -- COMMAND...   install loopwatch in COMMAND's Python processes, no code change
    loopwatch dump PID                      make a running process write a dump now (py-spy without loopwatch)
    loopwatch dumps DIR...                  the stalls in dump directories, grouped by culprit
    loopwatch report DIR... -o FILE.html    one self-contained incident page
    loopwatch dashboards [--namespace NS] [--out DIR]

``dashboards`` writes the Grafana dashboard (``NS.json``), the Prometheus recording and alerting rules
(``NS-rules.yml``) and provisioning examples for the metric namespace ``NS`` (the ``namespace`` option
of ``loopwatch.install()``), so a team whose metrics are ``oraculo_*`` gets ``oraculo_*`` dashboards.

Each other command lives in its own module, which adds its parser (``add_parsers(commands)``) and runs
it (the parser's ``handler`` default: ``handler(args, parser) -> exit status``).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from ._config import resolve
from ._dashboards import DEFAULT_NAMESPACE, RUNBOOK, render
from ._errors import ConfigError

COMMAND_MODULES = ("_run", "_remote", "_incidents")  # run; dump; dumps and report


def _dashboards(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    try:
        namespace = resolve({"namespace": args.namespace}, environ={}).namespace
    except ConfigError as exc:
        parser.error(str(exc))
    for path in render(namespace, Path(args.out), args.runbook_url):
        print(path)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loopwatch", description="Tools around the loopwatch agent.")
    commands = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(f"loopwatch.{name}").add_parsers(commands)
    dashboards = commands.add_parser("dashboards", help="write the Grafana dashboard and Prometheus rules for a namespace")
    dashboards.add_argument("--namespace", default=DEFAULT_NAMESPACE,
                            help=f"metric name prefix, as given to install() (default {DEFAULT_NAMESPACE})")
    dashboards.add_argument("--out", default=".", help="directory to write into (created if missing; default .)")
    dashboards.add_argument("--runbook-url", default=RUNBOOK,
                            help="where your copy of dashboards/RUNBOOK.md is served; each alert's runbook_url "
                                 "is this plus '#<alertname in lower case>' (default: the project's)")
    dashboards.set_defaults(handler=_dashboards)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.handler(args, parser) or 0)


if __name__ == "__main__":
    sys.exit(main())
