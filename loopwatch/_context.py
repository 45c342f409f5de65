"""Which request was blocked: the OpenTelemetry span and the structlog context of the task that was running.

A task runs every step in its own :class:`contextvars.Context` (``Task.get_context()``, public since 3.12;
on 3.11 the C task does not expose it, and it is the first ``Context`` among the task's referents, read
with ``gc.get_referents`` -- the task's own traversal, no code of the app), and so does every callback
(``Handle.get_context()`` / ``Handle._context``).
That context is where the request being served lives:

* OpenTelemetry's current context (``opentelemetry.context``'s ``ContextVar`` named ``current_context``)
  holds the active span; its ids, name and ``http.route`` are read with the public
  ``opentelemetry.trace.get_current_span(context)``;
* ``structlog.contextvars.bind_contextvars(request_id=...)`` binds one ``ContextVar`` per key, named
  ``structlog_<key>`` (an unbound key holds ``Ellipsis``).

The watchdog reads them **from its own thread, mid-stall**: a ``Context`` is an immutable mapping snapshot
(setting a variable makes a new one), so iterating it from another thread is safe, and nothing runs on the
loop -- no ``Context.run()`` (which would fail anyway: the task's context is entered on the loop thread).
Neither library is imported: an application that has no span has not imported OpenTelemetry.

Context values can hold secrets (tokens, e-mail addresses), so a value is copied only for the keys the
user allows (``context_keys``); the other keys are listed by name only.  Values are copied only when they
are plain data (``str``, numbers, ``bool``, ``None``, ``UUID``): formatting any other object would run the
application's ``__repr__`` on the watchdog thread, so those appear as ``<TypeName>``.
"""

from __future__ import annotations

import contextvars
import gc
import sys
from collections.abc import Iterable
from typing import Any

STRUCTLOG_PREFIX = "structlog_"  # structlog.contextvars.STRUCTLOG_KEY_PREFIX (since structlog 20.1)
OTEL_VAR = "current_context"  # the ContextVar of opentelemetry.context.contextvars_context
MAX_VARS = 256  # context variables looked at per read (a context is a handful in practice)
MAX_KEYS = 32  # structlog keys listed per read
MAX_VALUE = 256  # characters of an allowed value
_PLAIN = (str, int, float, bool, type(None))


def task_context(task: Any) -> Any:
    """A task's or handle's ``contextvars.Context`` (public ``get_context()`` from 3.12), or None."""
    get = getattr(task, "get_context", None)
    if get is not None:
        try:
            return get()
        except Exception:  # noqa: BLE001 - a foreign task class
            return None
    context = getattr(task, "_context", None)  # Python tasks, handles
    if context is None:  # 3.11's C task: its context is the first one it references (TaskObj_traverse)
        context = next((o for o in gc.get_referents(task) if isinstance(o, contextvars.Context)), None)
    return context


def _value(value: Any) -> Any:
    uuid = sys.modules.get("uuid")  # (a UUID exists only if the application imported uuid)
    if uuid is not None and isinstance(value, uuid.UUID):
        return str(value)
    if not isinstance(value, _PLAIN):
        return f"<{type(value).__name__}>"
    if isinstance(value, str) and len(value) > MAX_VALUE:
        return value[:MAX_VALUE] + "..."
    return value


class ContextReader:
    """Reads the request context out of a ``contextvars.Context``; ``keys`` are the structlog keys whose
    values may be copied (the ``context_keys`` option)."""

    def __init__(self, keys: Iterable[str] = ()) -> None:
        self.keys = frozenset(keys)

    def of_task(self, task: Any) -> dict[str, Any] | None:
        """The request context of ``task`` (see :meth:`read`); None if there is nothing to tell.  Never raises."""
        if task is None:
            return None
        try:
            return self.read(task_context(task))
        except Exception:  # noqa: BLE001 - never fail a dump for its context
            return None

    def read(self, context: Any) -> dict[str, Any] | None:
        """``{"trace_id", "span_id", "span_name", "route", "values", "other_keys"}``, the fields that have a
        value; None if the context has no span and no structlog key."""
        if context is None:
            return None
        out: dict[str, Any] = {}
        values: dict[str, Any] = {}
        others: list[str] = []
        otel_context = None
        for n, (var, value) in enumerate(context.items()):
            if n >= MAX_VARS:
                break
            name = getattr(var, "name", "")
            if name.startswith(STRUCTLOG_PREFIX):
                if value is Ellipsis or len(values) + len(others) >= MAX_KEYS:
                    continue
                key = name[len(STRUCTLOG_PREFIX):]
                if key in self.keys:
                    values[key] = _value(value)
                else:
                    others.append(key)
            elif name == OTEL_VAR and otel_context is None:
                otel_context = value
        if otel_context is not None:
            out.update(span_fields(otel_context))
        if values:
            out["values"] = dict(sorted(values.items()))  # (a context's order is its hash map's)
        if others:
            out["other_keys"] = sorted(others)
        return out or None


def span_fields(otel_context: Any) -> dict[str, Any]:
    """The active span of an OpenTelemetry context: ids in W3C hex, its name and ``http.route``."""
    trace = sys.modules.get("opentelemetry.trace")
    get_current_span = getattr(trace, "get_current_span", None)
    if get_current_span is None:
        return {}
    span = get_current_span(otel_context)
    span_context = span.get_span_context()
    if not getattr(span_context, "is_valid", False):
        return {}
    out: dict[str, Any] = {"trace_id": f"{span_context.trace_id:032x}", "span_id": f"{span_context.span_id:016x}"}
    name = getattr(span, "name", None)  # the SDK's spans have a name; the API's non-recording ones do not
    if isinstance(name, str):
        out["span_name"] = name[:MAX_VALUE]
    attributes = getattr(span, "attributes", None)
    route = attributes.get("http.route") if attributes is not None else None
    if isinstance(route, str):
        out["route"] = route[:MAX_VALUE]
    return out


def event_fields(context: dict[str, Any] | None) -> dict[str, Any]:
    """A context as the fields of a ``loopwatch.stall`` / ``loopwatch.slow_callback`` event."""
    if not context:
        return {}
    fields = {k: context[k] for k in ("trace_id", "span_id", "span_name", "route") if k in context}
    if "values" in context:
        fields["context"] = context["values"]
    if "other_keys" in context:
        fields["context_other_keys"] = context["other_keys"]
    return fields


def exemplar(context: dict[str, Any] | None) -> dict[str, str] | None:
    """The OpenMetrics exemplar labels of an observation made for this context: its trace, if it has one."""
    if not context or "trace_id" not in context:
        return None
    return {"trace_id": context["trace_id"], "span_id": context["span_id"]}
