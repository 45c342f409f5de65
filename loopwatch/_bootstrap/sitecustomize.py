"""``loopwatch run``'s bootstrap: installs loopwatch in every Python process of the command, no code change.

``loopwatch run`` puts this directory first on ``PYTHONPATH`` (and the options in ``LOOPWATCH_*``), so
every Python process the command starts -- the command itself, the workers a server forks or spawns,
any Python child -- imports this module at start-up, as Python's ``site`` does with any
``sitecustomize``.  What it does, in order:

1. **Chains** the ``sitecustomize`` the environment already has (the next one on ``sys.path``: a
   distribution's, a virtualenv's, another ``PYTHONPATH`` entry's), first, as if this one were not there;
   an error in it is reported the way ``site`` reports one (``Error in sitecustomize; ...``) and does
   not stop the rest.  This directory is then taken off ``sys.path`` again (``PYTHONPATH`` keeps it, for
   the children).
2. **Waits for the first event loop.**  Nothing of loopwatch is imported yet: a one-shot import hook
   wraps ``asyncio._set_running_loop`` right after ``asyncio`` is imported (uvloop, imported later,
   captures the wrapper), and the first loop that starts running in the process calls
   ``loopwatch.install()`` (options from ``LOOPWATCH_*``) inside that loop, in a callback of its first
   iteration -- after the callbacks already scheduled: the main task's first step, in which a server
   typically imports the application (uvicorn does), is start-up, not a stall to report (as with an
   ``install()`` in the app's lifespan).
   So a process that never runs an asyncio loop -- pip, a shell helper, gunicorn's or uvicorn's
   supervisor, multiprocessing's resource tracker -- costs nothing and takes no port of the
   ``metrics_port`` range; each worker that runs a loop takes its own.  A forked child installs on its
   own first loop as well (or resumes the agent it inherited, see ``loopwatch._fork``).  Not counted:
   loops a server's supervisor runs for itself (gunicorn's master runs its control socket and its
   dirty-worker arbiter on asyncio loops), and the loopwatch command line (``loopwatch.__main__``).
3. **Never raises into the process**: a failure (loopwatch not importable by this interpreter, an
   install error) writes one ``loopwatch run: pid=N not installed: <reason>`` line on stderr and the
   program goes on without loopwatch.  A successful install writes one ``loopwatch run: pid=N
   service=... metrics_url=... dump_dir=...`` line on stderr (not with ``loopwatch run --quiet``).

An application that calls ``loopwatch.install()`` itself still works: before its loop starts, its call
installs (and the bootstrap finds it installed); inside its loop, its call with options of its own
replaces the bootstrap's agent (see ``loopwatch._install_for_run``).

Not covered: interpreters started with ``-S`` (no ``site``), ``-E`` or ``-I`` (``PYTHONPATH`` ignored),
and interpreters that cannot import loopwatch (another virtualenv: the stderr line says so).  This file
must stay importable by any Python 3: it runs in every Python process of the command, whatever its
version.
"""

import importlib.machinery
import importlib.util
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
_tried_in = None  # the pid of the process that already tried to install (a forked child tries again)
_pending = None  # the loop whose first iteration will install, until it has
_installed_loop = None  # the loop the agent was installed in; see _set_running_loop
_SERVERS_OWN = ("gunicorn.ctl.", "gunicorn.dirty.arbiter")  # modules that start a supervisor's own loops


def _say(text):
    """One line on stderr, the only output of the bootstrap (never stdout: it may be data)."""
    try:
        stream = sys.stderr
        if stream is not None:
            stream.write("loopwatch run: pid=%d %s\n" % (os.getpid(), text))
            stream.flush()
    except Exception:  # noqa: BLE001 - a closed stderr is no reason to fail the host
        pass


def _chain():
    """Run the ``sitecustomize`` that would have run without this one (the next on ``sys.path``)."""
    others = [entry for entry in sys.path if os.path.abspath(entry or os.curdir) != _HERE]
    sys.path[:] = others  # invisible: PYTHONPATH still carries this directory to the children
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", others)
    if spec is None or spec.loader is None:
        return
    module = importlib.util.module_from_spec(spec)
    sys.modules["_loopwatch_chained_sitecustomize"] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # noqa: BLE001 - what site.execsitecustomize does with it
        if sys.flags.verbose:
            sys.excepthook(*sys.exc_info())
        else:
            sys.stderr.write("Error in sitecustomize; set PYTHONVERBOSE for traceback:\n"
                             "%s: %s\n" % (exc.__class__.__name__, exc))


def _install(loop):
    """In a process's first running loop (a callback of its first iteration): install; never raise."""
    global _installed_loop, _pending
    _pending = None
    try:
        agent = sys.modules["loopwatch"]._install_for_run()
    except BaseException as exc:  # noqa: BLE001 - never into the host (SystemExit/KeyboardInterrupt too)
        _failed(exc)
        if isinstance(exc, KeyboardInterrupt):
            raise
        return
    _installed_loop = loop
    if os.environ.get("LOOPWATCH_RUN_QUIET", "").strip().lower() in ("1", "true", "yes", "on"):
        return
    try:
        snapshot = agent.snapshot()
        _say("service=%s metrics_url=%s dump_dir=%s" % (
            agent.options.service.replace(" ", "_"), snapshot.metrics_url, snapshot.dump_dir))
    except Exception:  # noqa: BLE001
        pass


def _failed(exc):
    reason = "%s: %s" % (exc.__class__.__name__, exc)
    if isinstance(exc, ImportError) and getattr(exc, "name", None) == "loopwatch":
        reason = "loopwatch is not importable by this Python (%s): install it there" % sys.executable
    _say("not installed: " + reason.replace("\n", " "))


def _wrap(original):
    def _set_running_loop(loop):
        """``asyncio._set_running_loop``, which also installs loopwatch when the first loop starts."""
        if loop is None:
            previous = _events._get_running_loop() if _installed_loop is not None else None
            original(None)
            if previous is not None and previous is _installed_loop:
                try:
                    _stopped(previous)
                except Exception:  # noqa: BLE001 - never into the host
                    pass
            return
        original(loop)
        try:
            _starting(loop)
        except Exception as exc:  # noqa: BLE001 - never into the host
            _say("not installed: %s: %s" % (exc.__class__.__name__, exc))

    return _set_running_loop


def _starting(loop):
    """A loop starts running: schedule the install once per process (two loops starting at once in two
    threads: ``install()`` is idempotent) -- or again if the loop that was to install was closed before it
    ran an iteration."""
    global _tried_in, _pending
    if _tried_in == os.getpid() and (_pending is None or not _pending.is_closed()):
        return
    if _servers_own() or "loopwatch.__main__" in sys.modules:  # (the loopwatch command line: not a service)
        return
    _tried_in = os.getpid()
    try:
        import loopwatch  # noqa: F401 - here, not in the callback: asyncio's debug mode would report it as a slow one
    except BaseException as exc:  # noqa: BLE001
        _failed(exc)
        if isinstance(exc, KeyboardInterrupt):
            raise
        return
    _pending = loop
    try:
        loop.call_soon(_install, loop)  # after what was already scheduled: see the module docstring
    except Exception:
        _pending = None
        raise


def _servers_own():
    """True for a loop a server's supervisor runs for itself, not for the service: gunicorn's master runs
    its control socket (``gunicorn.ctl``) and its dirty-worker arbiter on asyncio loops.  loopwatch is not
    installed for those (the master would take a port of the range and put loopwatch's fork handlers
    around every worker it forks); its workers install on their own loops."""
    frame = sys._getframe(2)
    while frame is not None:
        if (frame.f_globals.get("__name__") or "").startswith(_SERVERS_OWN):
            return True
        frame = frame.f_back
    return False


def _stopped(loop):
    """The loop loopwatch was installed in stopped running.  uvloop captured this wrapper when it was
    imported, before loopwatch was, so loopwatch's own hook (``loopwatch._hooks``) learns of the stops of
    later runs (it wraps ``uvloop.Loop.run_forever``) but not of this one, which was already running:
    tell it, unless the call came through its own wrapper (stdlib loops look the function up each call)."""
    global _installed_loop
    _installed_loop = None
    hooks = sys.modules.get("loopwatch._hooks")
    if hooks is None:
        return
    try:
        caller = sys._getframe(2).f_code  # 0: _stopped, 1: _set_running_loop, 2: who called it
    except ValueError:
        caller = None
    if caller is not getattr(hooks._set_running_loop, "__code__", None):
        hooks._notify(1, loop)


def _patch(asyncio):
    """Wrap ``asyncio._set_running_loop`` where asyncio and its loops look it up."""
    global _events
    _events = asyncio.events
    original = getattr(_events, "_set_running_loop", None)
    if original is None:
        return
    wrapper = _wrap(original)
    for module in (_events, asyncio):
        if getattr(module, "_set_running_loop", None) is original:
            module._set_running_loop = wrapper


class _AfterAsyncio:
    """A one-shot import hook: patches ``asyncio`` right after it is imported (importing it here would
    cost every Python process of the command ~35 ms, most of which never run a loop)."""

    def find_spec(self, name, path=None, target=None):
        if name != "asyncio":
            return None
        try:
            sys.meta_path.remove(self)
        except ValueError:
            pass
        spec = importlib.util.find_spec(name)
        loader = getattr(spec, "loader", None)
        if loader is None:
            return spec
        if isinstance(loader, type):  # a class of classmethods (frozen): wrap this spec's loader instead
            spec.loader = _PatchingLoader(loader)
            return spec
        execute = loader.exec_module  # this spec's own loader object: patch the instance only

        def exec_module(module):
            try:
                execute(module)
            finally:
                del loader.exec_module  # back to its class's method
            _patch_guarded(module)

        try:
            loader.exec_module = exec_module
        except AttributeError:  # __slots__
            spec.loader = _PatchingLoader(loader)
        return spec

    def invalidate_caches(self):
        pass


class _PatchingLoader:
    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        _patch_guarded(module)

    def __getattr__(self, name):
        return getattr(self._loader, name)


def _patch_guarded(asyncio):
    try:
        _patch(asyncio)
    except Exception as exc:  # noqa: BLE001
        _say("not installed: cannot hook asyncio: %s: %s" % (exc.__class__.__name__, exc))


def _patch_when_imported():
    if "asyncio" in sys.modules:
        _patch(sys.modules["asyncio"])
        return
    hook = _AfterAsyncio()
    sys.meta_path.insert(0, hook)


_events = None
_chain()
try:
    _patch_when_imported()
except Exception as _exc:  # noqa: BLE001 - never into the host
    _say("not installed: %s: %s" % (_exc.__class__.__name__, _exc))
