"""Options: defaults, ``LOOPWATCH_*`` environment variables and validation, in one place.

Explicit keyword arguments win over the environment, which wins over the defaults.  Every value is
validated here, once, so the rest of the agent can trust :class:`Options`.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import os
import signal
import ssl
import re
import sys
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry

from ._errors import ConfigError

ENV_PREFIX = "LOOPWATCH_"
_METRIC_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
_TRUE = {"1", "true", "yes", "on"}
SLOW_CALLBACK_MODES = ("auto", "exact", "off")
# OpenTelemetry metrics export (the ``[otel]`` extra): off, the app's global MeterProvider, loopwatch's own
# OTLP/HTTP one configured by the standard OTEL_* variables, or whichever of the two is there (auto).
OTEL_METRICS_MODES = ("off", "auto", "global", "otlp")
# Features the ``disable`` option switches off: each then exports nothing, patches nothing, runs nothing.
FEATURES = ("threads", "gil", "executors", "pools", "tasks", "slow_callbacks")
_FALSE = {"0", "false", "no", "off"}
# The console: aiomonitor's own default port for its terminal UI (MONITOR_TERMUI_PORT), not imported here.
CONSOLE_DEFAULT_PORT = 20101
CONSOLE_DEFAULT_ADDR = "127.0.0.1"


def _default_service() -> str:
    argv0 = sys.argv[0] if sys.argv and sys.argv[0] else ""
    path = Path(argv0) if argv0 and argv0 != "-c" else None
    if path is None:
        return "python"
    return (path.parent.name if path.stem == "__main__" else path.stem) or "python"


def _default_dump_dir() -> Path:
    """Per user: ``$TMPDIR/loopwatch-<uid>`` (another user's directory there is refused, see ``_dumps``)."""
    return Path(tempfile.gettempdir()) / f"loopwatch-{os.getuid()}"


@dataclasses.dataclass(frozen=True)
class Options:
    """The agent's validated configuration (see the README's configuration table)."""

    namespace: str = "loopwatch"
    service: str = dataclasses.field(default_factory=_default_service)
    metrics_port: int | tuple[int, int] = 9320  # a port, 0 (no exporter), or a range (first, last)
    metrics_addr: str = "0.0.0.0"
    registry: Any = dataclasses.field(default=REGISTRY, compare=False, repr=False)
    probe_interval: float = 1.0
    lag_thresholds: tuple[float, ...] = (0.5, 2.0, 10.0)
    dump_dir: Path = dataclasses.field(default_factory=_default_dump_dir)
    dump_cooldown: float = 60.0
    dump_keep: int = 20
    faulthandler: bool = True
    slow_callback_threshold: float = 0.1
    slow_callback_mode: str = "auto"
    gil_probe_interval: float = 1.0
    executor_wait_threshold: float = 0.5
    native_stacks: bool = False
    accelerator: bool = True
    disable: frozenset[str] = frozenset()
    # TLS for the exporter: prometheus_client's start_http_server parameters, with the metrics_ prefix.
    metrics_certfile: Path | None = None
    metrics_keyfile: Path | None = None
    metrics_client_cafile: Path | None = None
    metrics_client_capath: Path | None = None
    metrics_client_auth_required: bool = False
    # ``loopwatch dump PID``: the signal that asks this process for a dump ("auto", "off", or a number).
    dump_signal: int | str = "auto"
    # The aiomonitor console: 0 (off), a port, or a range (first, last) for several processes.
    console: int | tuple[int, int] = 0
    console_addr: str = CONSOLE_DEFAULT_ADDR
    console_task_factory: bool = False
    # structlog context keys whose values go into dumps and events (the others: by name only).
    context_keys: tuple[str, ...] = ()
    otel_metrics: str = "off"

    def enabled(self, feature: str) -> bool:
        """Whether ``feature`` (one of ``FEATURES``) is on: not named in ``disable``."""
        return feature not in self.disable

    @property
    def dump_threshold(self) -> float:
        """Lag at which a stall is dumped: the smallest threshold."""
        return self.lag_thresholds[0]

    @property
    def metrics_ports(self) -> range:
        """The ports the exporter may bind, in order (empty for ``metrics_port=0``)."""
        port = self.metrics_port
        if isinstance(port, tuple):
            return range(port[0], port[1] + 1)
        return range(port, port + 1) if port else range(0)

    @property
    def console_ports(self) -> range:
        """The ports the console may bind, in order (empty when it is off)."""
        port = self.console
        if isinstance(port, tuple):
            return range(port[0], port[1] + 1)
        return range(port, port + 1) if port else range(0)

    @property
    def metrics_port_text(self) -> str:
        """``"9320"`` or ``"9320-9329"``: how messages name the port or the range."""
        port = self.metrics_port
        return f"{port[0]}-{port[1]}" if isinstance(port, tuple) else str(port)



OPTION_NAMES: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(Options))


def _fail(name: str, source: str | None, accepted: str, value: Any) -> ConfigError:
    where = f" (from {source})" if source else ""
    return ConfigError(f"{name}{where} must be {accepted}, got {value!r}")


def _number(name: str, value: Any, source: str | None, *, low: float, high: float,
            low_inclusive: bool = False, what: str) -> float:
    try:
        if isinstance(value, bool):
            raise TypeError
        number = float(value)
    except (TypeError, ValueError):
        raise _fail(name, source, what, value) from None
    too_low = number < low if low_inclusive else number <= low
    if math.isnan(number) or too_low or number > high:
        raise _fail(name, source, what, value)
    return number


def _integer(name: str, value: Any, source: str | None, *, low: int, high: int, what: str) -> int:
    if isinstance(value, str):
        try:
            value_int = int(value.strip())
        except ValueError:
            raise _fail(name, source, what, value) from None
    elif isinstance(value, int) and not isinstance(value, bool):
        value_int = value
    else:
        raise _fail(name, source, what, value)
    if not low <= value_int <= high:
        raise _fail(name, source, what, value)
    return value_int


_PORT_RANGE = re.compile(r"^\s*(\d+)\s*-\s*(\d+)\s*$")


def _metrics_port(value: Any, source: str | None) -> int | tuple[int, int]:
    """A port (``9320``, ``"9320"``), ``0``, or a range: ``"9320-9329"`` or ``(9320, 9329)``."""
    name = "metrics_port"
    range_what = "a port range 'FIRST-LAST' with 1 <= FIRST <= LAST <= 65535"
    is_range = isinstance(value, tuple) or (isinstance(value, str) and "-" in value.strip()[1:])
    if not is_range:
        return _integer(name, value, source, low=0, high=65535,
                        what="an integer port in 0..65535 (0 = no built-in exporter)")
    if isinstance(value, str):
        match = _PORT_RANGE.match(value)
        if not match:
            raise _fail(name, source, range_what, value)
        first, last = int(match.group(1)), int(match.group(2))
    else:
        if len(value) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise _fail(name, source, range_what, value)
        first, last = value
    if not 1 <= first <= last <= 65535:
        raise _fail(name, source, range_what, value)
    return (first, last)


def _console(value: Any, source: str | None) -> int | tuple[int, int]:
    """``False``/``True`` (aiomonitor's port, 20101), a port, or a range ``"20101-20110"`` / ``(20101, 20110)``
    (one port per process: the first free one).  From the environment ``1/true/yes/on`` and
    ``0/false/no/off`` read as booleans."""
    what = "True, False, a port in 1024..65535 or a port range 'FIRST-LAST' (one port per process)"
    if isinstance(value, bool):
        return CONSOLE_DEFAULT_PORT if value else 0
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return CONSOLE_DEFAULT_PORT if value.strip().lower() in _TRUE else 0
    if isinstance(value, int) and value == 0:
        return 0
    if isinstance(value, tuple) or (isinstance(value, str) and "-" in value.strip()[1:]):
        if isinstance(value, str):
            match = _PORT_RANGE.match(value)
            if not match:
                raise _fail("console", source, what, value)
            first, last = int(match.group(1)), int(match.group(2))
        elif len(value) == 2 and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            first, last = value
        else:
            raise _fail("console", source, what, value)
        if not 1024 <= first <= last <= 65535:
            raise _fail("console", source, what, value)
        return (first, last)
    return _integer("console", value, source, low=1024, high=65535, what=what)


def _ipv4(name: str, value: Any, source: str | None) -> str:
    what = "an IPv4 address to bind (aiomonitor's telnet server is IPv4 only), e.g. '127.0.0.1'"
    if not isinstance(value, str):
        raise _fail(name, source, what, value)
    try:
        return str(ipaddress.IPv4Address(value.strip()))
    except ValueError:
        raise _fail(name, source, what, value) from None


def signal_choices() -> tuple[int, ...]:
    """The signals ``dump_signal`` may name: SIGUSR1, SIGUSR2 and the real-time ones."""
    rt = range(int(signal.SIGRTMIN), int(signal.SIGRTMAX) + 1) if hasattr(signal, "SIGRTMIN") else range(0)
    return (int(signal.SIGUSR1), int(signal.SIGUSR2), *rt)


def signal_name(number: int) -> str:
    """``SIGUSR1``, ``SIGRTMIN+3``, ``SIGRTMAX-2``: how ``kill -l`` spells a signal."""
    if hasattr(signal, "SIGRTMIN") and signal.SIGRTMIN <= number <= signal.SIGRTMAX:
        low, high = int(signal.SIGRTMIN), int(signal.SIGRTMAX)
        return f"SIGRTMIN+{number - low}" if number - low <= (high - low) // 2 else f"SIGRTMAX-{high - number}"
    try:
        return signal.Signals(number).name
    except ValueError:
        return str(number)


_SIGNAL_NAME = re.compile(r"^(?:SIG)?(USR1|USR2|RTMIN|RTMAX)(?:([+-])(\d+))?$")


def _dump_signal(value: Any, source: str | None) -> int | str:
    """``"auto"`` (a free real-time signal), ``"off"``/``0``/``False``, or a signal by number or name."""
    low, high = (int(signal.SIGRTMIN), int(signal.SIGRTMAX)) if hasattr(signal, "SIGRTMIN") else (0, 0)
    what = (f"'auto', 'off' (or 0), or a signal servers leave alone -- SIGUSR1, SIGUSR2 or a real-time signal "
            f"SIGRTMIN..SIGRTMAX ({low}..{high}) -- by name or number")
    if value is False:
        return "off"
    number: int | None = None
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, str):
        text = value.strip().upper()
        if text == "AUTO":
            return "auto"
        if text.lower() in _FALSE or text == "NONE":
            return "off"
        if text.isdigit():
            number = int(text)
        else:
            match = _SIGNAL_NAME.match(text.replace(" ", ""))
            if match is not None:
                base = {"USR1": int(signal.SIGUSR1), "USR2": int(signal.SIGUSR2), "RTMIN": low, "RTMAX": high}
                number = base[match.group(1)]
                if match.group(2):
                    if match.group(1) in ("USR1", "USR2"):
                        raise _fail("dump_signal", source, what, value)
                    number += int(match.group(3)) * (1 if match.group(2) == "+" else -1)
    if number == 0:
        return "off"
    if number is None or number not in signal_choices():
        raise _fail("dump_signal", source, what, value)
    return number


def _thresholds(value: Any, source: str | None) -> tuple[float, ...]:
    what = "increasing positive seconds"
    items: Any = value
    if isinstance(value, str):
        items = [part for part in re.split(r"[,\s]+", value.strip().strip("()[]")) if part]
    if not isinstance(items, Iterable) or isinstance(items, (bytes, Mapping)):
        raise _fail("lag_thresholds", source, what, value)
    numbers: list[float] = []
    for item in items:
        try:
            if isinstance(item, bool):
                raise TypeError
            numbers.append(float(item))
        except (TypeError, ValueError):
            raise _fail("lag_thresholds", source, what, value) from None
    shown = value if isinstance(value, str) else tuple(numbers)
    if any(math.isnan(n) or math.isinf(n) or n <= 0 for n in numbers):
        raise _fail("lag_thresholds", source, what, shown)
    if any(b <= a for a, b in zip(numbers, numbers[1:])):
        raise _fail("lag_thresholds", source, what, shown)
    if not 1 <= len(numbers) <= 8:
        raise _fail("lag_thresholds", source, "1 to 8 increasing positive seconds", shown)
    return tuple(numbers)


def _features(value: Any, source: str | None) -> frozenset[str]:
    """``"gil,pools"``, ``"gil pools"``, ``("gil", "pools")`` or ``""``/``()`` (nothing off)."""
    what = "feature names among " + ", ".join(repr(f) for f in FEATURES) + " (comma-separated in a string)"
    items: Any = value
    if isinstance(value, str):
        items = [part for part in re.split(r"[,\s]+", value.strip()) if part]
    if not isinstance(items, Iterable) or isinstance(items, (bytes, Mapping)):
        raise _fail("disable", source, what, value)
    names = []
    for item in items:
        if not isinstance(item, str) or item.strip().lower() not in FEATURES:
            raise _fail("disable", source, what, value)
        names.append(item.strip().lower())
    return frozenset(names)


_CONTEXT_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,63}$")
MAX_CONTEXT_KEYS = 32


def _context_keys(value: Any, source: str | None) -> tuple[str, ...]:
    """``"request_id,tenant"``, ``"request_id tenant"``, ``("request_id", "tenant")`` or ``""``/``()``."""
    what = (f"a list of at most {MAX_CONTEXT_KEYS} context key names (letters, digits, '_', '.', '-'; up to 64 "
            f"characters, not starting with a digit), comma-separated in a string")
    items: Any = value
    if isinstance(value, str):
        items = [part for part in re.split(r"[,\s]+", value.strip()) if part]
    if not isinstance(items, Iterable) or isinstance(items, (bytes, Mapping)):
        raise _fail("context_keys", source, what, value)
    keys: list[str] = []
    for item in items:
        if not isinstance(item, str) or not _CONTEXT_KEY.match(item):
            raise _fail("context_keys", source, what, value)
        if item not in keys:
            keys.append(item)
    if len(keys) > MAX_CONTEXT_KEYS:
        raise _fail("context_keys", source, what, value)
    return tuple(keys)


def _is_zero(value: Any) -> bool:
    try:
        return not isinstance(value, bool) and float(value) == 0.0
    except (TypeError, ValueError):
        return False


def _boolean(name: str, value: Any, source: str | None) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise _fail(name, source, "a boolean (true/false, 1/0, yes/no, on/off)", value)


def _readable(name: str, value: Any, source: str | None, *, directory: bool) -> Path:
    kind = "directory" if directory else "file"
    if not isinstance(value, (str, os.PathLike)) or not os.fspath(value).strip():
        raise _fail(name, source, f"the path of a readable {kind}", value)
    path = Path(os.fspath(value)).expanduser()
    if not (path.is_dir() if directory else path.is_file()) or not os.access(path, os.R_OK):
        raise _fail(name, source, f"the path of a readable {kind}", value)
    return path


def _check_tls(values: dict[str, Any]) -> None:
    """The exporter's TLS options fit together, and the certificate, key and CA load (an error names the
    option and what is wrong, at ``install()``, not at the first scrape)."""
    cert, key = values.get("metrics_certfile"), values.get("metrics_keyfile")
    cafile, capath = values.get("metrics_client_cafile"), values.get("metrics_client_capath")
    if (cert is None) != (key is None):
        given, missing = ("metrics_certfile", "metrics_keyfile") if key is None else ("metrics_keyfile", "metrics_certfile")
        raise ConfigError(f"{given} is set but {missing} is not: TLS for the exporter needs both (a PEM "
                          f"certificate and its private key)")
    if cert is None:
        for name in ("metrics_client_cafile", "metrics_client_capath", "metrics_client_auth_required"):
            if values.get(name):
                raise ConfigError(f"{name} needs TLS: set metrics_certfile and metrics_keyfile too")
        return
    if values.get("metrics_client_auth_required") and cafile is None and capath is None:
        raise ConfigError("metrics_client_auth_required=True needs the CA that signs the clients' certificates: "
                          "set metrics_client_cafile or metrics_client_capath")
    try:
        tls_context(cert, key, cafile, capath, bool(values.get("metrics_client_auth_required")))
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(f"metrics_certfile={str(cert)!r} / metrics_keyfile={str(key)!r} (or the client CA) do "
                          f"not load as a PEM certificate, its private key and CA certificates: {exc}") from None


def _check_console(values: dict[str, Any]) -> None:
    """The console's own options mean nothing while it is off: say so rather than ignore them."""
    if values.get("console"):
        return
    if values.get("console_addr", CONSOLE_DEFAULT_ADDR) != CONSOLE_DEFAULT_ADDR:
        raise ConfigError(f"console_addr={values['console_addr']!r} is set but console is off: set console=True "
                          f"(or a port) too")
    if values.get("console_task_factory"):
        raise ConfigError("console_task_factory=True is set but console is off: set console=True (or a port) too")


def tls_context(certfile: Path, keyfile: Path, cafile: Path | None, capath: Path | None,
                client_auth_required: bool) -> ssl.SSLContext:
    """The exporter's server-side TLS context, as prometheus_client's ``start_http_server`` builds it from
    the same parameters (TLS 1.2 or later; clients verified against the CA when one is given, and required
    to present a certificate with ``client_auth_required``)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if cafile is not None or capath is not None:
        context.load_verify_locations(cafile, capath)
        context.verify_mode = ssl.CERT_REQUIRED if client_auth_required else ssl.CERT_OPTIONAL
    context.load_cert_chain(certfile, keyfile)
    return context


def _validate(name: str, value: Any, source: str | None) -> Any:
    if name == "namespace":
        if not isinstance(value, str) or not _METRIC_NAME.match(value) or ":" in value:
            raise _fail(name, source, "a Prometheus metric name prefix ([a-zA-Z_][a-zA-Z0-9_]*)", value)
        return value
    if name == "service":
        if not isinstance(value, str) or not value.strip() or len(value) > 128:
            raise _fail(name, source, "a non-empty string of at most 128 characters", value)
        return value
    if name == "metrics_port":
        return _metrics_port(value, source)
    if name == "metrics_addr":
        if not isinstance(value, str) or not value.strip() or any(c.isspace() for c in value):
            raise _fail(name, source, "a host name or IP address to bind, e.g. '0.0.0.0' or '127.0.0.1'",
                        value)
        return value
    if name == "registry":
        if not isinstance(value, CollectorRegistry):
            raise _fail(name, source, "a prometheus_client.CollectorRegistry", value)
        return value
    if name == "probe_interval":
        return _number(name, value, source, low=0.001, high=60.0, low_inclusive=True,
                       what="seconds between 0.001 and 60")
    if name == "lag_thresholds":
        return _thresholds(value, source)
    if name == "dump_dir":
        if not isinstance(value, (str, os.PathLike)) or not os.fspath(value).strip():
            raise _fail(name, source, "a directory path", value)
        return Path(os.fspath(value)).expanduser()
    if name == "dump_cooldown":
        return _number(name, value, source, low=0.0, high=86400.0, low_inclusive=True,
                       what="seconds between 0 and 86400")
    if name == "dump_keep":
        return _integer(name, value, source, low=0, high=100000,
                        what="an integer between 0 and 100000 (0 = no dumps)")
    if name in ("metrics_certfile", "metrics_keyfile", "metrics_client_cafile", "metrics_client_capath"):
        return _readable(name, value, source, directory=name == "metrics_client_capath")
    if name in ("faulthandler", "native_stacks", "accelerator", "metrics_client_auth_required"):
        return _boolean(name, value, source)
    if name == "slow_callback_threshold":
        return _number(name, value, source, low=0.001, high=60.0, low_inclusive=True,
                       what="seconds between 0.001 and 60")
    if name == "slow_callback_mode":
        if not isinstance(value, str) or value.strip().lower() not in SLOW_CALLBACK_MODES:
            raise _fail(name, source, "one of 'auto', 'exact', 'off'", value)
        return value.strip().lower()
    if name == "gil_probe_interval":
        if _is_zero(value):
            return 0.0
        return _number(name, value, source, low=0.01, high=60.0, low_inclusive=True,
                       what="seconds between 0.01 and 60, or 0 to turn the GIL probe off")
    if name == "executor_wait_threshold":
        return _number(name, value, source, low=0.001, high=3600.0, low_inclusive=True,
                       what="seconds between 0.001 and 3600")
    if name == "disable":
        return _features(value, source)
    if name == "dump_signal":
        return _dump_signal(value, source)
    if name == "console":
        return _console(value, source)
    if name == "console_addr":
        return _ipv4(name, value, source)
    if name == "console_task_factory":
        return _boolean(name, value, source)
    if name == "context_keys":
        return _context_keys(value, source)
    if name == "otel_metrics":
        if not isinstance(value, str) or value.strip().lower() not in OTEL_METRICS_MODES:
            raise _fail(name, source, "one of " + ", ".join(repr(m) for m in OTEL_METRICS_MODES), value)
        return value.strip().lower()
    raise AssertionError(name)  # pragma: no cover - OPTION_NAMES and this function move together


def resolve(explicit: Mapping[str, Any], environ: Mapping[str, str] | None = None) -> Options:
    """Build :class:`Options` from explicit arguments, then ``LOOPWATCH_*`` variables, then defaults.

    Raises :class:`ConfigError` naming the first invalid option.
    """
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for name in OPTION_NAMES:
        if name in explicit and explicit[name] is not None:
            values[name] = _validate(name, explicit[name], None)
            continue
        env_name = ENV_PREFIX + name.upper()
        if name != "registry" and env_name in env:
            values[name] = _validate(name, env[env_name], env_name)
    _check_tls(values)
    _check_console(values)
    off = values.get("disable", frozenset())  # wins over the feature's own options (an operator's switch)
    if "slow_callbacks" in off:
        values["slow_callback_mode"] = "off"
    if "gil" in off:
        values["gil_probe_interval"] = 0.0
    return Options(**values)
