"""``loopwatch run [OPTIONS] -- COMMAND [ARGS...]``: loopwatch in a command's Python processes, no code change.

Like ``opentelemetry-instrument`` or ``ddtrace-run``: the options become ``LOOPWATCH_*`` variables, the
bootstrap directory (``loopwatch/_bootstrap``, whose only file is a ``sitecustomize``) goes first on
``PYTHONPATH``, and the command replaces this process (``os.execvpe``: its pid, signals and exit status
are the command's own).  Every Python process the command starts then installs loopwatch when its first
event loop starts running -- see ``loopwatch/_bootstrap/sitecustomize.py``.  Processes that are not
Python run unaffected.

Every option is checked here, before the command starts, by the validation ``install()`` runs
(``_config.resolve``), ``LOOPWATCH_*`` variables already in the environment included: a bad one exits
with status 2 and the same message (``lag_thresholds must be increasing positive seconds, got '2,0.5'``),
and the command never starts.

Options: a flag per option of ``install()`` (``--lag-thresholds 0.5,2,10`` is ``LOOPWATCH_LAG_THRESHOLDS``),
flags winning over the environment.  Relative paths (``--dump-dir dumps``) are made absolute here, so a
worker that changes directory (``gunicorn --chdir``) still writes where the operator meant.  Without
``--metrics-port`` or ``LOOPWATCH_METRICS_PORT``, the exporter port is the range ``9320-9329`` (the
library's default port and the nine after it): each process binds the first free port of it, so the
workers of a server are each their own scrape target.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

from ._config import ENV_PREFIX, OPTION_NAMES, Options, _validate, resolve
from ._errors import ConfigError

BOOTSTRAP = Path(__file__).resolve().parent / "_bootstrap"
DEFAULT_PORTS = "9320-9329"
QUIET_ENV = "LOOPWATCH_RUN_QUIET"  # the bootstrap's own switch; not an option of install()
_PATH_OPTIONS = ("dump_dir", "metrics_certfile", "metrics_keyfile", "metrics_client_cafile", "metrics_client_capath")
_NOT_FROM_THE_COMMAND_LINE = ("registry",)  # an object, not a value: install() only

_HELP = {
    "namespace": "metric name prefix (default loopwatch)",
    "service": "the service label on every series (default: each process's script name)",
    "metrics_port": f"exporter port, 0 for none, or a range FIRST-LAST: each process binds the first free "
                    f"port in it (default {DEFAULT_PORTS})",
    "metrics_addr": "exporter bind address (default 0.0.0.0; 127.0.0.1 keeps it local)",
    "dump_dir": "where stall dumps go (default $TMPDIR/loopwatch-<uid>)",
    "lag_thresholds": "comma-separated increasing seconds: spike counters; the first is the dump trigger "
                      "(default 0.5,2,10)",
    "disable": "features to switch off, comma-separated: threads, gil, executors, pools, tasks, slow_callbacks",
    "probe_interval": "seconds between lag probe beats (default 1)",
    "dump_cooldown": "minimum seconds between automatic dumps (default 60)",
    "dump_keep": "dumps kept in dump_dir, 0 for no dumps (default 20)",
    "slow_callback_threshold": "seconds after which a callback is slow (default 0.1)",
    "slow_callback_mode": "auto, exact or off (default auto)",
    "gil_probe_interval": "seconds between GIL probe samples, 0 for none (default 1)",
    "executor_wait_threshold": "seconds of executor queue wait that log a warning (default 0.5)",
    "faulthandler": "stacks of stalls that hold the GIL, written by the loop thread on a timer signal (default true)",
    "native_stacks": "add the loop thread's native stack to mid-stall dumps with py-spy (default false)",
    "accelerator": "use the compiled C accelerator when built (default true)",
    "metrics_certfile": "serve /metrics over HTTPS with this PEM certificate (with --metrics-keyfile)",
    "metrics_keyfile": "the PEM private key of --metrics-certfile",
    "metrics_client_cafile": "PEM file of the CA that signs scrapers' client certificates",
    "metrics_client_capath": "directory of CA certificates that sign scrapers' client certificates",
    "otel_metrics": "OpenTelemetry metrics export: off, auto, global or otlp (the [otel] extra; default off)",
    "metrics_client_auth_required": "refuse scrapers without a client certificate signed by that CA (default false)",
}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _is_boolean(field: dataclasses.Field) -> bool:  # type: ignore[type-arg]
    return isinstance(field.default, bool)


def add_parsers(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    run = commands.add_parser(
        "run", help="run a command with loopwatch installed in its Python processes (no code change)",
        usage="loopwatch run [OPTIONS] -- COMMAND [ARGS...]",
        description="Run COMMAND with loopwatch installed in each of its Python processes (the command, the "
                    "workers it forks or spawns, their Python children) when their first asyncio loop starts. "
                    "Each option is also read from LOOPWATCH_<NAME>; a flag wins over the variable. Options "
                    "are checked before COMMAND starts: a bad one exits with status 2. COMMAND replaces this "
                    "process: its exit status is loopwatch run's.",
        epilog="examples:\n"
               "  loopwatch run --service api --dump-dir /var/lib/api/dumps -- python app.py\n"
               "  loopwatch run --metrics-port 9320-9329 -- uvicorn app:app --workers 2\n"
               "  loopwatch run -- gunicorn -k uvicorn_worker.UvicornWorker -w 2 app:app",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    fields = {field.name: field for field in dataclasses.fields(Options)}
    for name in OPTION_NAMES:
        if name in _NOT_FROM_THE_COMMAND_LINE:
            continue
        env = ENV_PREFIX + name.upper()
        text = _HELP.get(name, "see the README's configuration table")
        if _is_boolean(fields[name]):
            run.add_argument(_flag(name), dest=name, metavar="BOOL", nargs="?", const="true",
                             help=f"{text + '; ' if name in _HELP else ''}true/false (a bare flag: true) [{env}]")
        else:
            run.add_argument(_flag(name), dest=name, metavar=name.split("_")[-1].upper(), help=f"{text} [{env}]")
    run.add_argument("-q", "--quiet", action="store_true",
                     help="no 'loopwatch run: pid=...' line on stderr from each process that installs "
                          f"(failures are still reported) [{QUIET_ENV}=1]")
    run.add_argument("command", nargs=argparse.REMAINDER, metavar="COMMAND",
                     help="the command and its arguments, after --")
    run.set_defaults(handler=lambda args, _parser: run_command(args, run))


def command_environment(args: argparse.Namespace, environ: dict[str, str] | os._Environ[str]) -> dict[str, str]:
    """The command's environment: ``environ`` with the options' ``LOOPWATCH_*`` variables and the bootstrap
    first on ``PYTHONPATH``.  Raises :class:`ConfigError` (``install()``'s message) for a bad option."""
    env = dict(environ)
    for name in OPTION_NAMES:
        value = getattr(args, name, None)
        if value is not None:
            _validate(name, value, _flag(name))  # the error names the flag the operator typed
            env[ENV_PREFIX + name.upper()] = value
    for name in _PATH_OPTIONS:
        key = ENV_PREFIX + name.upper()
        if env.get(key, "").strip():
            env[key] = os.path.abspath(os.path.expanduser(env[key]))
    env.setdefault(ENV_PREFIX + "METRICS_PORT", DEFAULT_PORTS)
    resolve({}, environ=env)  # what install() will check in each process: fail now, not in every worker
    if args.quiet:
        env[QUIET_ENV] = "1"
    existing = env.get("PYTHONPATH", "")  # its entries kept as they are (an empty one means the cwd)
    entries = [entry for entry in existing.split(os.pathsep) if not entry or os.path.abspath(entry) != str(BOOTSTRAP)]
    env["PYTHONPATH"] = os.pathsep.join([str(BOOTSTRAP), *entries]) if existing else str(BOOTSTRAP)
    return env


def run_command(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        parser.error("a command is required: loopwatch run [OPTIONS] -- COMMAND [ARGS...]")
    try:
        env = command_environment(args, os.environ)
    except ConfigError as exc:
        parser.error(str(exc))
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execvpe(command[0], command, env)
    except FileNotFoundError:
        print(f"loopwatch run: {command[0]}: command not found", file=sys.stderr)
        return 127
    except OSError as exc:  # not executable, a directory, ...
        print(f"loopwatch run: {command[0]}: {exc.strerror or exc}", file=sys.stderr)
        return 126
    return 0  # pragma: no cover - execvpe does not return
