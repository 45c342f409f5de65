/* loopwatch._accel: the parts of loopwatch that run on every loop iteration or every garbage
 * collection, in C.  Each has a pure-Python twin (loopwatch/_iteration.py, loopwatch/_gc.py) with the
 * same behaviour; loopwatch uses this module when it was built (``option accelerator``).
 *
 * PollClock    stands in for the epoll/poll object of a stdlib selector: the loop's iteration clock.  It
 *              stamps when each busy stretch began (the moment the poll for I/O returned), sums busy
 *              time, and calls back with (start, end) for every stretch at least ``threshold`` long.
 * SelectClock  the same, wrapping a selector's select() (for the selectors without such an object).
 * UvClock      the same for uvloop, through libuv prepare and check handles on the loop's uv_loop_t
 *              (uvloop.loop.libuv_get_loop_t_ptr); libuv's functions are looked up in uvloop's own
 *              extension module.  Its callbacks run without the GIL: finished long stretches go to a
 *              ring that Python drains.
 * GcWatch      a gc.callbacks entry: when each collection ran, its generation, on which thread.
 *
 * Times are CLOCK_MONOTONIC nanoseconds, the clock of time.monotonic().
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <dlfcn.h>
#include <stddef.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static inline int64_t
mono_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static PyObject *zero_int;  /* the small int 0 (a singleton): asyncio's select(0) */

/* ---------------------------------------------------------------------------------------------- */
/* Park: lets the watchdog sleep while every loop waits for I/O                                    */
/* ---------------------------------------------------------------------------------------------- */
/* A watchdog that looks every SAMPLE_AT of the threshold costs a wake-up each time, even while the
 * loops are idle.  When it finds them idle it *parks*: it sleeps on a timerfd that the loops arm.  While
 * parked, each busy stretch arms that timerfd (and the fallback's signal timer) to fire when the stretch
 * would need a look, and disarms them when it ends: a short stretch (a timer, a request) costs two or
 * four system calls and no wake-up; a long one wakes the watchdog exactly when it should look.  After
 * ``max_stretches`` stretches the loop is busy, not idle: the watchdog is poked awake and polls again. */

#include <sys/timerfd.h>
#include <unistd.h>

typedef struct {
    PyObject_HEAD
    int parked;
    int armed;              /* this park armed the timers for the stretch in progress */
    int stretches;          /* stretches since parking */
    int max_stretches;
    int timerfd;            /* the watchdog sleeps on it */
    int poke_fd;            /* writing to it wakes the watchdog */
    int64_t delay;          /* ns after a stretch began that the watchdog must look */
    int64_t signal_delay;   /* ns after a stretch began that the fallback's signal fires, then every repeat */
    int64_t repeat;
    int64_t due;            /* ns: when the armed timerfd fires (0: not armed) */
    timer_t signal_timer;
    int has_signal_timer;
} Park;

static void
set_timerfd(int fd, int64_t at)
{
    struct itimerspec spec = {{0, 0}, {at / 1000000000LL, at % 1000000000LL}};
    timerfd_settime(fd, at ? TFD_TIMER_ABSTIME : 0, &spec, NULL);
}

static void
set_signal_timer(Park *park, int64_t at)
{
    if (!park->has_signal_timer) {
        return;
    }
    int64_t repeat = at ? park->repeat : 0;
    struct itimerspec spec = {{repeat / 1000000000LL, repeat % 1000000000LL},
                              {at / 1000000000LL, at % 1000000000LL}};
    timer_settime(park->signal_timer, at ? TIMER_ABSTIME : 0, &spec, NULL);
}

static void
park_stretch_began(Park *park, int64_t now)
{
    if (++park->stretches > park->max_stretches) {  /* busy, not idle: the watchdog polls again */
        park->parked = 0;
        char byte = 0;
        if (write(park->poke_fd, &byte, 1) < 0) {
            /* the pipe is full: the watchdog is being woken anyway */
        }
        return;
    }
    park->due = now + park->delay;
    set_timerfd(park->timerfd, park->due);
    set_signal_timer(park, now + park->signal_delay);
    park->armed = 1;
}

static void
park_stretch_ended(Park *park)
{
    set_timerfd(park->timerfd, 0);
    set_signal_timer(park, 0);
    park->armed = 0;
}

static int
park_init(Park *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"poke_fd", "max_stretches", NULL};
    int poke_fd, max_stretches = 10;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "i|i", kwlist, &poke_fd, &max_stretches)) {
        return -1;
    }
    if (self->timerfd > 0) {
        close(self->timerfd);
    }
    self->timerfd = timerfd_create(CLOCK_MONOTONIC, TFD_CLOEXEC | TFD_NONBLOCK);
    if (self->timerfd < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    self->poke_fd = poke_fd;
    self->max_stretches = max_stretches;
    return 0;
}

static void
park_dealloc(Park *self)
{
    if (self->timerfd > 0) {
        close(self->timerfd);
    }
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *
park_park(Park *self, PyObject *args)
{
    /* park(delay, signal_delay, repeat, signal_timer or None): the watchdog is about to sleep. */
    double delay, signal_delay, repeat;
    PyObject *timer;
    if (!PyArg_ParseTuple(args, "dddO", &delay, &signal_delay, &repeat, &timer)) {
        return NULL;
    }
    self->delay = (int64_t)(delay * 1e9);
    self->signal_delay = (int64_t)(signal_delay * 1e9);
    self->repeat = (int64_t)(repeat * 1e9);
    self->has_signal_timer = timer != Py_None;
    if (self->has_signal_timer) {
        void *value = PyLong_AsVoidPtr(timer);
        if (value == NULL && PyErr_Occurred()) {
            return NULL;
        }
        self->signal_timer = (timer_t)value;
    }
    self->stretches = 0;
    self->armed = 0;
    self->parked = 1;
    Py_RETURN_NONE;
}

static PyObject *
park_unpark(Park *self, PyObject *Py_UNUSED(ignored))
{
    /* The watchdog woke up: it looks, and re-arms the fallback itself from now on. */
    int was = self->parked;
    self->parked = 0;
    if (self->armed) {
        set_timerfd(self->timerfd, 0);
        self->armed = 0;
    }
    uint64_t expirations;
    while (read(self->timerfd, &expirations, sizeof expirations) > 0) {
    }
    return PyBool_FromLong(was);
}

static PyObject *
park_began(Park *self, PyObject *arg)
{
    /* For the pure-Python clocks: a stretch began at ``arg`` seconds (while parked). */
    double at = PyFloat_AsDouble(arg);
    if (at == -1.0 && PyErr_Occurred()) {
        return NULL;
    }
    if (self->parked) {
        park_stretch_began(self, (int64_t)(at * 1e9));
    }
    Py_RETURN_NONE;
}

static PyObject *
park_ended(Park *self, PyObject *Py_UNUSED(ignored))
{
    if (self->parked && self->armed) {
        park_stretch_ended(self);
    }
    Py_RETURN_NONE;
}

static PyObject *
park_get_parked(Park *self, void *closure)
{
    return PyBool_FromLong(self->parked);
}

static PyObject *
park_get_due(Park *self, void *closure)
{
    if (!self->armed) {
        Py_RETURN_NONE;
    }
    return PyFloat_FromDouble(self->due / 1e9);
}

static PyObject *
park_get_fileno(Park *self, void *closure)
{
    return PyLong_FromLong(self->timerfd);
}

static PyMethodDef park_methods[] = {
    {"park", (PyCFunction)park_park, METH_VARARGS, "park(delay, signal_delay, repeat, signal_timer)"},
    {"unpark", (PyCFunction)park_unpark, METH_NOARGS, "the watchdog woke up; True if it was parked"},
    {"began", (PyCFunction)park_began, METH_O, "a stretch began at this time (pure-Python clocks)"},
    {"ended", (PyCFunction)park_ended, METH_NOARGS, "the stretch ended (pure-Python clocks)"},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef park_getset[] = {
    {"parked", (getter)park_get_parked, NULL, "the watchdog is parked", NULL},
    {"timerfd", (getter)park_get_fileno, NULL, "the timerfd the watchdog sleeps on", NULL},
    {"due", (getter)park_get_due, NULL, "when the armed timerfd fires (monotonic s), or None", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject ParkType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "loopwatch._accel.Park",
    .tp_doc = "Park(poke_fd, max_stretches=10): the watchdog's parking (see _accel.c).",
    .tp_basicsize = sizeof(Park),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)park_init,
    .tp_dealloc = (destructor)park_dealloc,
    .tp_methods = park_methods,
    .tp_getset = park_getset,
};

/* ---------------------------------------------------------------------------------------------- */
/* SelectClock                                                                                     */
/* ---------------------------------------------------------------------------------------------- */

typedef struct {
    PyObject_HEAD
    PyObject *original;   /* the selector's bound select */
    PyObject *on_long;    /* on_long(start, end): a stretch >= threshold ended (loop thread) */
    PyObject *clock;      /* tests: a Python clock in seconds instead of CLOCK_MONOTONIC, or NULL */
    int64_t threshold;    /* ns */
    int64_t start;        /* ns: when the busy stretch in progress began; 0 while select() waits */
    int64_t busy;         /* ns: busy time so far */
    Park *park;           /* the watchdog's parking, or NULL */
    vectorcallfunc vectorcall;
} SelectClock;

static int64_t
sc_now(SelectClock *self)
{
    if (self->clock == NULL) {
        return mono_ns();
    }
    PyObject *value = PyObject_CallNoArgs(self->clock);
    if (value == NULL) {
        PyErr_Clear();
        return mono_ns();
    }
    double seconds = PyFloat_AsDouble(value);
    Py_DECREF(value);
    if (seconds == -1.0 && PyErr_Occurred()) {
        PyErr_Clear();
        return mono_ns();
    }
    return (int64_t)(seconds * 1e9 + (seconds >= 0 ? 0.5 : -0.5));
}

static void
sc_long(SelectClock *self, int64_t start, int64_t end)
{
    /* Never raises into the loop; keeps an exception already set (select() failed) as it is. */
#if PY_VERSION_HEX >= 0x030C0000
    PyObject *raised = PyErr_GetRaisedException();
#else
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
#endif
    PyObject *result = PyObject_CallFunction(self->on_long, "dd", start / 1e9, end / 1e9);
    if (result == NULL) {
        PyErr_Clear();
    }
    Py_XDECREF(result);
#if PY_VERSION_HEX >= 0x030C0000
    PyErr_SetRaisedException(raised);
#else
    PyErr_Restore(type, value, tb);
#endif
}

static PyObject *
sc_timed(SelectClock *self, PyObject *callable, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    /* Call ``callable`` (the wait for I/O) and time the busy stretches around it. */
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    int zero = 0;
    if (nargs >= 1 && (kwnames == NULL || nargs > PyTuple_GET_SIZE(kwnames))) {
        PyObject *timeout = args[0];
        zero = timeout == zero_int || (PyFloat_CheckExact(timeout) && PyFloat_AS_DOUBLE(timeout) == 0.0);
    }
    if (zero) {
        /* Callbacks are ready: the poll does not wait, and its few microseconds count as busy. */
        PyObject *result = PyObject_Vectorcall(callable, args, nargsf, kwnames);
        int64_t now = sc_now(self);
        int64_t start = self->start ? self->start : now;
        self->start = now;
        self->busy += now - start;
        if (now - start >= self->threshold && result != NULL) {
            sc_long(self, start, now);
        }
        return result;
    }
    int64_t now = sc_now(self);
    int64_t start = self->start ? self->start : now;
    self->busy += now - start;
    self->start = 0;
    Park *park = self->park;
    if (park != NULL && park->parked && park->armed) {
        park_stretch_ended(park);
    }
    if (now - start >= self->threshold) {
        sc_long(self, start, now);
    }
    PyObject *result = PyObject_Vectorcall(callable, args, nargsf, kwnames);
    self->start = sc_now(self);
    if (park != NULL && park->parked) {
        park_stretch_began(park, self->start);
    }
    return result;
}

static PyObject *
sc_vectorcall(PyObject *op, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    SelectClock *self = (SelectClock *)op;
    return sc_timed(self, self->original, args, nargsf, kwnames);
}

static int
sc_init(SelectClock *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"original", "threshold", "on_long", "clock", NULL};
    PyObject *original, *on_long, *clock = Py_None;
    double threshold;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OdO|O", kwlist, &original, &threshold, &on_long, &clock)) {
        return -1;
    }
    Py_INCREF(original);
    Py_XSETREF(self->original, original);
    Py_INCREF(on_long);
    Py_XSETREF(self->on_long, on_long);
    if (clock != Py_None) {
        Py_INCREF(clock);
        Py_XSETREF(self->clock, clock);
    }
    self->threshold = threshold >= 9e18 / 1e9 ? INT64_MAX : (int64_t)(threshold * 1e9);
    self->busy = 0;
    self->start = sc_now(self);
    self->vectorcall = sc_vectorcall;
    return 0;
}

static int
sc_traverse(SelectClock *self, visitproc visit, void *arg)
{
    Py_VISIT(self->original);
    Py_VISIT(self->on_long);
    Py_VISIT(self->clock);
    Py_VISIT(self->park);
    return 0;
}

static int
sc_clear(SelectClock *self)
{
    Py_CLEAR(self->original);
    Py_CLEAR(self->on_long);
    Py_CLEAR(self->clock);
    Py_CLEAR(self->park);
    return 0;
}

static void
sc_dealloc(SelectClock *self)
{
    PyObject_GC_UnTrack(self);
    sc_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *
sc_read(SelectClock *self, PyObject *Py_UNUSED(ignored))
{
    /* (busy seconds so far, start of the stretch in progress in seconds, or None while waiting) */
    int64_t start = self->start;
    if (start == 0) {
        return Py_BuildValue("(dO)", self->busy / 1e9, Py_None);
    }
    return Py_BuildValue("(dd)", self->busy / 1e9, start / 1e9);
}

static PyObject *
sc_restart(SelectClock *self, PyObject *arg)
{
    /* A new busy stretch from now; a true argument counts the one so far as busy (the loop stops
     * running), a false one does not (the loop starts running again after a pause). */
    int count = PyObject_IsTrue(arg);
    if (count < 0) {
        return NULL;
    }
    int64_t now = sc_now(self);
    if (count && self->start != 0) {
        self->busy += now - self->start;
    }
    self->start = now;
    Py_RETURN_NONE;
}

static PyObject *
sc_get_original(SelectClock *self, void *closure)
{
    return Py_NewRef(self->original);
}

static PyObject *
sc_get_park(SelectClock *self, void *closure)
{
    return Py_NewRef(self->park ? (PyObject *)self->park : Py_None);
}

static int
sc_set_park(SelectClock *self, PyObject *value, void *closure)
{
    if (value != NULL && value != Py_None && !PyObject_TypeCheck(value, &ParkType)) {
        PyErr_SetString(PyExc_TypeError, "park must be a loopwatch._accel.Park or None");
        return -1;
    }
    Py_XSETREF(self->park, value == NULL || value == Py_None ? NULL : (Park *)Py_NewRef(value));
    return 0;
}

static PyMethodDef sc_methods[] = {
    {"read", (PyCFunction)sc_read, METH_NOARGS, "(busy seconds, start of the busy stretch or None)"},
    {"restart", (PyCFunction)sc_restart, METH_O, "start a new busy stretch now; True: count the last one"},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef sc_getset[] = {
    {"original", (getter)sc_get_original, NULL, "the wrapped select", NULL},
    {"park", (getter)sc_get_park, (setter)sc_set_park, "the watchdog's parking, or None", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject SelectClockType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "loopwatch._accel.SelectClock",
    .tp_doc = "SelectClock(original, threshold, on_long, clock=None): a timing select() wrapper.",
    .tp_basicsize = sizeof(SelectClock),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_vectorcall_offset = offsetof(SelectClock, vectorcall),
    .tp_call = PyVectorcall_Call,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)sc_init,
    .tp_dealloc = (destructor)sc_dealloc,
    .tp_traverse = (traverseproc)sc_traverse,
    .tp_clear = (inquiry)sc_clear,
    .tp_methods = sc_methods,
    .tp_getset = sc_getset,
};

/* ---------------------------------------------------------------------------------------------- */
/* PollClock: stands in for an epoll/poll object inside a stdlib selector                          */
/* ---------------------------------------------------------------------------------------------- */
/* EpollSelector.select() (and PollSelector's, DevpollSelector's) is Python code around one C call,
 * ``self._selector.poll(...)``.  Putting this object in ``_selector`` times that call from C to C: the
 * Python select() keeps running inline in asyncio's frame.  (A C wrapper around select() itself makes
 * CPython enter a new evaluation loop for it on every iteration: ~1,000 instructions.)  The other
 * methods selectors call (register, modify, unregister, close, fileno) are the real object's. */

typedef struct {
    SelectClock clock;    /* ``original`` is the real object's bound poll */
    PyObject *target;     /* the real epoll/poll object */
} PollClock;

static PyObject *
pc_poll(PollClock *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    return sc_timed(&self->clock, self->clock.original, args, (size_t)nargs, kwnames);
}

static int
pc_init(PollClock *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"target", "threshold", "on_long", "clock", NULL};
    PyObject *target, *on_long, *clock = Py_None;
    double threshold;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OdO|O", kwlist, &target, &threshold, &on_long, &clock)) {
        return -1;
    }
    PyObject *poll = PyObject_GetAttrString(target, "poll");
    if (poll == NULL) {
        return -1;
    }
    PyObject *sc_args = Py_BuildValue("(NdOO)", poll, threshold, on_long, clock);
    if (sc_args == NULL) {
        return -1;
    }
    int rc = sc_init(&self->clock, sc_args, NULL);
    Py_DECREF(sc_args);
    if (rc < 0) {
        return -1;
    }
    Py_INCREF(target);
    Py_XSETREF(self->target, target);
    return 0;
}

/* The other methods selectors call on their epoll/poll object, forwarded.  Explicit methods (no
 * tp_getattro): CPython's fast method lookup only works with the generic attribute lookup. */
static PyObject *
pc_forward(PollClock *self, const char *name, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    PyObject *method = PyObject_GetAttrString(self->target, name);
    if (method == NULL) {
        return NULL;
    }
    PyObject *result = PyObject_Vectorcall(method, args, (size_t)nargs, kwnames);
    Py_DECREF(method);
    return result;
}

#define FORWARD(name) \
    static PyObject *pc_##name(PollClock *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames) \
    { return pc_forward(self, #name, args, nargs, kwnames); }
FORWARD(register)
FORWARD(modify)
FORWARD(unregister)
FORWARD(close)
FORWARD(fileno)
#undef FORWARD

static PyObject *
pc_get_closed(PollClock *self, void *closure)
{
    return PyObject_GetAttrString(self->target, "closed");
}

static int
pc_traverse(PollClock *self, visitproc visit, void *arg)
{
    Py_VISIT(self->target);
    return sc_traverse(&self->clock, visit, arg);
}

static int
pc_clear(PollClock *self)
{
    Py_CLEAR(self->target);
    return sc_clear(&self->clock);
}

static void
pc_dealloc(PollClock *self)
{
    PyObject_GC_UnTrack(self);
    pc_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *
pc_get_target(PollClock *self, void *closure)
{
    return Py_NewRef(self->target);
}

#define FORWARDED(name) {#name, (PyCFunction)(void (*)(void))pc_##name, METH_FASTCALL | METH_KEYWORDS, "the real " #name "()"}
static PyMethodDef pc_methods[] = {
    {"poll", (PyCFunction)(void (*)(void))pc_poll, METH_FASTCALL | METH_KEYWORDS, "the real poll(), timed"},
    FORWARDED(register),
    FORWARDED(modify),
    FORWARDED(unregister),
    FORWARDED(close),
    FORWARDED(fileno),
    {"read", (PyCFunction)sc_read, METH_NOARGS, "(busy seconds, start of the busy stretch or None)"},
    {"restart", (PyCFunction)sc_restart, METH_O, "start a new busy stretch now; True: count the last one"},
    {NULL, NULL, 0, NULL},
};

static PyObject *
pc_get_park(PollClock *self, void *closure)
{
    return sc_get_park(&self->clock, closure);
}

static int
pc_set_park(PollClock *self, PyObject *value, void *closure)
{
    return sc_set_park(&self->clock, value, closure);
}

static PyGetSetDef pc_getset[] = {
    {"target", (getter)pc_get_target, NULL, "the real epoll/poll object", NULL},
    {"park", (getter)pc_get_park, (setter)pc_set_park, "the watchdog's parking, or None", NULL},
    {"closed", (getter)pc_get_closed, NULL, "the real object's closed", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject PollClockType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "loopwatch._accel.PollClock",
    .tp_doc = "PollClock(target, threshold, on_long, clock=None): an epoll/poll object whose poll() is timed.",
    .tp_basicsize = sizeof(PollClock),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)pc_init,
    .tp_dealloc = (destructor)pc_dealloc,
    .tp_traverse = (traverseproc)pc_traverse,
    .tp_clear = (inquiry)pc_clear,
    .tp_methods = pc_methods,
    .tp_getset = pc_getset,
};

/* ---------------------------------------------------------------------------------------------- */
/* UvClock: libuv prepare/check handles on a uvloop loop                                           */
/* ---------------------------------------------------------------------------------------------- */

#define UV_CHECK_TYPE 2    /* uv_handle_type values, stable across libuv 1.x */
#define UV_PREPARE_TYPE 9
#define RING 64

typedef void (*uv_cb)(void *handle);
typedef int (*uv_init_fn)(void *loop, void *handle);
typedef int (*uv_start_fn)(void *handle, uv_cb cb);
typedef void (*uv_unref_fn)(void *handle);
typedef void (*uv_close_fn)(void *handle, uv_cb close_cb);
typedef size_t (*uv_handle_size_fn)(int type);
typedef uint64_t (*uv_now_fn)(const void *loop);

static struct {
    int ready;
    uv_init_fn check_init, prepare_init;
    uv_start_fn check_start, prepare_start;
    uv_unref_fn unref;
    uv_close_fn close;
    uv_handle_size_fn handle_size;
    uv_now_fn now;
} uv;

typedef struct uvstate {
    void *loop;
    int64_t threshold;
    _Atomic int64_t start;       /* ns: the stretch in progress began (not in the poll phase) */
    _Atomic int in_poll;         /* between prepare (about to poll for I/O) and check (after it) */
    _Atomic int64_t poll_entry;  /* ns: when the poll phase began */
    _Atomic int64_t busy;        /* ns */
    _Atomic uint64_t head;       /* ring of finished long stretches, written by the loop thread */
    uint64_t tail;               /* read under the GIL by drain() */
    int64_t ring[RING][2];
    int open_handles;
    void *check;
    void *prepare;
} uvstate;

static uvstate *
container(void *handle)
{
    /* Each handle is allocated with a pointer to its state just before it. */
    return *((uvstate **)handle - 1);
}

static void
uv_push(uvstate *st, int64_t start, int64_t end)
{
    uint64_t head = atomic_load_explicit(&st->head, memory_order_relaxed);
    st->ring[head % RING][0] = start;
    st->ring[head % RING][1] = end;
    atomic_store_explicit(&st->head, head + 1, memory_order_release);
}

static void
on_prepare(void *handle)
{
    uvstate *st = container(handle);
    int64_t now = mono_ns();
    int64_t start = atomic_load_explicit(&st->start, memory_order_relaxed);
    atomic_fetch_add_explicit(&st->busy, now - start, memory_order_relaxed);
    if (now - start >= st->threshold) {
        uv_push(st, start, now);
    }
    atomic_store_explicit(&st->poll_entry, now, memory_order_relaxed);
    atomic_store_explicit(&st->in_poll, 1, memory_order_release);
}

static void
on_check(void *handle)
{
    uvstate *st = container(handle);
    int64_t entry = atomic_load_explicit(&st->poll_entry, memory_order_relaxed);
    /* libuv updates the loop's time (ms) right after epoll returns: I/O callbacks ran since then. */
    int64_t returned = (int64_t)uv.now(st->loop) * 1000000LL;
    atomic_store_explicit(&st->start, returned > entry ? returned : entry, memory_order_relaxed);
    atomic_store_explicit(&st->in_poll, 0, memory_order_release);
}

static void
on_closed(void *handle)
{
    uvstate *st = container(handle);
    free((uvstate **)handle - 1);
    if (--st->open_handles == 0) {
        free(st);
    }
}

typedef struct {
    PyObject_HEAD
    uvstate *st;
} UvClock;

static int
uv_resolve(const char *path)
{
    if (uv.ready) {
        return 0;
    }
    void *lib = dlopen(path, RTLD_NOW | RTLD_NOLOAD);
    if (lib == NULL) {
        PyErr_Format(PyExc_OSError, "uvloop's module is not loaded: %s", dlerror());
        return -1;
    }
#define RESOLVE(field, name) \
    *(void **)(&uv.field) = dlsym(lib, name); \
    if (uv.field == NULL) { \
        PyErr_Format(PyExc_OSError, "uvloop's module does not export libuv's %s", name); \
        return -1; \
    }
    RESOLVE(check_init, "uv_check_init");
    RESOLVE(check_start, "uv_check_start");
    RESOLVE(prepare_init, "uv_prepare_init");
    RESOLVE(prepare_start, "uv_prepare_start");
    RESOLVE(unref, "uv_unref");
    RESOLVE(close, "uv_close");
    RESOLVE(handle_size, "uv_handle_size");
    RESOLVE(now, "uv_now");
#undef RESOLVE
    uv.ready = 1;
    return 0;
}

static void *
uv_new_handle(uvstate *st, int type)
{
    size_t size = uv.handle_size(type);
    void **block = calloc(1, sizeof(void *) + size);  /* zeroed: handle->data is NULL */
    if (block == NULL) {
        return NULL;
    }
    block[0] = st;
    return block + 1;
}

static int
uvc_init(UvClock *self, PyObject *args, PyObject *kwds)
{
    /* UvClock(capsule, uvloop_module_path, threshold): must be called in the loop's thread while it
     * runs (libuv is not thread-safe); the handles do not keep the loop alive. */
    static char *kwlist[] = {"capsule", "library", "threshold", NULL};
    PyObject *capsule;
    const char *path;
    double threshold;
    if (self->st != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "UvClock already started");
        return -1;
    }
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "Osd", kwlist, &capsule, &path, &threshold)) {
        return -1;
    }
    void *loop = PyCapsule_GetPointer(capsule, NULL);
    if (loop == NULL || uv_resolve(path) < 0) {
        return -1;
    }
    uvstate *st = calloc(1, sizeof(uvstate));
    if (st == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    st->loop = loop;
    st->threshold = threshold >= 9e18 / 1e9 ? INT64_MAX : (int64_t)(threshold * 1e9);
    st->start = mono_ns();
    st->check = uv_new_handle(st, UV_CHECK_TYPE);
    st->prepare = uv_new_handle(st, UV_PREPARE_TYPE);
    if (st->check == NULL || st->prepare == NULL) {
        free(st->check ? (void **)st->check - 1 : NULL);
        free(st->prepare ? (void **)st->prepare - 1 : NULL);
        free(st);
        PyErr_NoMemory();
        return -1;
    }
    if (uv.check_init(loop, st->check) != 0) {
        free((void **)st->check - 1);
        free((void **)st->prepare - 1);
        free(st);
        PyErr_SetString(PyExc_OSError, "uv_check_init failed");
        return -1;
    }
    if (uv.prepare_init(loop, st->prepare) != 0) {
        free((void **)st->prepare - 1);
        st->open_handles = 1;
        uv.close(st->check, on_closed);  /* libuv frees it at the loop's next run */
        PyErr_SetString(PyExc_OSError, "uv_prepare_init failed");
        return -1;
    }
    st->open_handles = 2;
    uv.check_start(st->check, on_check);
    uv.prepare_start(st->prepare, on_prepare);
    uv.unref(st->check);
    uv.unref(st->prepare);
    self->st = st;
    return 0;
}

static PyObject *
uvc_state(UvClock *self, PyObject *Py_UNUSED(ignored))
{
    /* (in_poll, stretch start, poll entry, the loop's time (ms resolution), busy), in seconds */
    uvstate *st = self->st;
    if (st == NULL) {
        Py_RETURN_NONE;
    }
    int in_poll = atomic_load_explicit(&st->in_poll, memory_order_acquire);
    return Py_BuildValue("(Odddd)", in_poll ? Py_True : Py_False,
                         atomic_load_explicit(&st->start, memory_order_relaxed) / 1e9,
                         atomic_load_explicit(&st->poll_entry, memory_order_relaxed) / 1e9,
                         (double)uv.now(st->loop) / 1e3,
                         atomic_load_explicit(&st->busy, memory_order_relaxed) / 1e9);
}

static PyObject *
uvc_drain(UvClock *self, PyObject *Py_UNUSED(ignored))
{
    /* The long stretches that ended since the last call: [(start, end), ...] in seconds. */
    uvstate *st = self->st;
    PyObject *out = PyList_New(0);
    if (st == NULL || out == NULL) {
        return out;
    }
    uint64_t head = atomic_load_explicit(&st->head, memory_order_acquire);
    if (head - st->tail > RING) {
        st->tail = head - RING;  /* overrun: the oldest are lost */
    }
    for (; st->tail < head; st->tail++) {
        PyObject *item = Py_BuildValue("(dd)", st->ring[st->tail % RING][0] / 1e9,
                                       st->ring[st->tail % RING][1] / 1e9);
        if (item == NULL || PyList_Append(out, item) < 0) {
            Py_XDECREF(item);
            Py_DECREF(out);
            return NULL;
        }
        Py_DECREF(item);
    }
    return out;
}

static PyObject *
uvc_close(UvClock *self, PyObject *Py_UNUSED(ignored))
{
    /* Close the handles (in the loop's thread, the loop not running): libuv frees them at its next run,
     * which uvloop's close() does before it closes the loop. */
    uvstate *st = self->st;
    if (st != NULL) {
        self->st = NULL;
        uv.close(st->check, on_closed);
        uv.close(st->prepare, on_closed);
    }
    Py_RETURN_NONE;
}

static PyMethodDef uvc_methods[] = {
    {"state", (PyCFunction)uvc_state, METH_NOARGS, "(in_poll, start, poll_entry, loop_time, busy)"},
    {"drain", (PyCFunction)uvc_drain, METH_NOARGS, "finished long stretches [(start, end)]"},
    {"close", (PyCFunction)uvc_close, METH_NOARGS, "close the libuv handles (loop thread)"},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject UvClockType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "loopwatch._accel.UvClock",
    .tp_doc = "UvClock(capsule, library, threshold): uvloop's iteration clock (libuv prepare/check).",
    .tp_basicsize = sizeof(UvClock),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)uvc_init,
    .tp_methods = uvc_methods,
};

/* ---------------------------------------------------------------------------------------------- */
/* GcWatch: a gc.callbacks entry                                                                   */
/* ---------------------------------------------------------------------------------------------- */

#define GC_RING 64

typedef struct {
    PyObject_HEAD
    int64_t min_ns;             /* passes shorter than this are not kept */
    unsigned long thread;       /* the collection in progress: its thread, start and generation */
    int64_t started;            /* 0: none in progress */
    long generation;
    uint64_t head;
    struct { unsigned long thread; int64_t start, end; long generation; } ring[GC_RING];
} GcWatch;

static PyObject *generation_key;

static PyObject *
gc_call(GcWatch *self, PyObject *args, PyObject *kwds)
{
    PyObject *phase, *info;
    if (!PyArg_UnpackTuple(args, "GcWatch", 2, 2, &phase, &info)) {
        return NULL;
    }
    const char *text = PyUnicode_Check(phase) ? PyUnicode_AsUTF8(phase) : NULL;
    if (text == NULL) {
        PyErr_Clear();
        Py_RETURN_NONE;
    }
    int64_t now = mono_ns();
    if (text[2] == 'a') {  /* "start" */
        PyObject *gen = PyDict_Check(info) ? PyDict_GetItemWithError(info, generation_key) : NULL;
        self->generation = gen != NULL ? PyLong_AsLong(gen) : -1;
        if (PyErr_Occurred()) {
            PyErr_Clear();
        }
        self->thread = PyThread_get_thread_ident();
        self->started = now;
    }
    else if (self->started != 0) {  /* "stop" */
        if (now - self->started >= self->min_ns) {
            uint64_t i = self->head++ % GC_RING;
            self->ring[i].thread = self->thread;
            self->ring[i].start = self->started;
            self->ring[i].end = now;
            self->ring[i].generation = self->generation;
        }
        self->started = 0;
    }
    Py_RETURN_NONE;
}

static int
gc_init(GcWatch *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"min_seconds", NULL};
    double min_seconds = 0.001;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|d", kwlist, &min_seconds)) {
        return -1;
    }
    self->min_ns = (int64_t)(min_seconds * 1e9);
    return 0;
}

static PyObject *
gc_passes(GcWatch *self, PyObject *Py_UNUSED(ignored))
{
    /* ([(thread, start, end, generation), ...] oldest first, (thread, start, generation) or None) */
    PyObject *out = PyList_New(0);
    if (out == NULL) {
        return NULL;
    }
    uint64_t first = self->head > GC_RING ? self->head - GC_RING : 0;
    for (uint64_t i = first; i < self->head; i++) {
        PyObject *item = Py_BuildValue("(kddl)", self->ring[i % GC_RING].thread, self->ring[i % GC_RING].start / 1e9,
                                       self->ring[i % GC_RING].end / 1e9, self->ring[i % GC_RING].generation);
        if (item == NULL || PyList_Append(out, item) < 0) {
            Py_XDECREF(item);
            Py_DECREF(out);
            return NULL;
        }
        Py_DECREF(item);
    }
    PyObject *current = self->started ? Py_BuildValue("(kdl)", self->thread, self->started / 1e9, self->generation)
                                      : Py_NewRef(Py_None);
    if (current == NULL) {
        Py_DECREF(out);
        return NULL;
    }
    return Py_BuildValue("(NN)", out, current);
}

static PyMethodDef gc_methods[] = {
    {"passes", (PyCFunction)gc_passes, METH_NOARGS, "(recent passes, the one in progress or None)"},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject GcWatchType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "loopwatch._accel.GcWatch",
    .tp_doc = "GcWatch(min_seconds=0.001): a gc.callbacks entry that times collections.",
    .tp_basicsize = sizeof(GcWatch),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)gc_init,
    .tp_call = (ternaryfunc)gc_call,
    .tp_methods = gc_methods,
};

/* ---------------------------------------------------------------------------------------------- */

static PyObject *
accel_monotonic(PyObject *module, PyObject *Py_UNUSED(ignored))
{
    return PyFloat_FromDouble(mono_ns() / 1e9);
}

/* thread_cpu(): {tid: CPU seconds (user + system)} of every thread of this process, from
 * /proc/self/task/<tid>/stat -- the fields psutil reads.  Read here, holding the GIL throughout: a
 * scrape under GIL contention would otherwise hand the GIL over (and wait to get it back, up to a switch
 * interval per busy thread) at every open, read and close of every thread's file. */
#include <dirent.h>
#include <fcntl.h>

static PyObject *
accel_thread_cpu(PyObject *module, PyObject *Py_UNUSED(ignored))
{
    long ticks = sysconf(_SC_CLK_TCK);
    DIR *dir = opendir("/proc/self/task");
    if (dir == NULL) {
        return PyErr_SetFromErrnoWithFilename(PyExc_OSError, "/proc/self/task");
    }
    PyObject *out = PyDict_New();
    struct dirent *entry;
    char path[64], buf[1024];
    while (out != NULL && (entry = readdir(dir)) != NULL) {
        if (entry->d_name[0] < '0' || entry->d_name[0] > '9') {
            continue;
        }
        snprintf(path, sizeof path, "/proc/self/task/%s/stat", entry->d_name);
        int fd = open(path, O_RDONLY | O_CLOEXEC);
        if (fd < 0) {
            continue;  /* the thread ended meanwhile */
        }
        ssize_t n = read(fd, buf, sizeof buf - 1);
        close(fd);
        if (n <= 0) {
            continue;
        }
        buf[n] = '\0';
        char *p = strrchr(buf, ')');  /* the name (field 2) may hold spaces and parentheses */
        if (p == NULL || p[1] != ' ') {
            continue;
        }
        p += 2;  /* field 3 (state) */
        for (int field = 3; field < 14 && *p; p++) {
            if (*p == ' ') {
                field++;
            }
        }
        unsigned long long utime, stime;
        if (sscanf(p, "%llu %llu", &utime, &stime) != 2) {
            continue;
        }
        PyObject *key = PyLong_FromString(entry->d_name, NULL, 10);
        PyObject *value = PyFloat_FromDouble((double)(utime + stime) / (double)(ticks > 0 ? ticks : 100));
        if (key == NULL || value == NULL || PyDict_SetItem(out, key, value) < 0) {
            Py_CLEAR(out);
        }
        Py_XDECREF(key);
        Py_XDECREF(value);
    }
    closedir(dir);
    return out;
}

/* The exporter's I/O, GIL held (see _exporter): under GIL contention every system call that releases the
 * GIL costs a wait to get it back -- up to a switch interval per busy thread -- so a scrape of a busy
 * service would take hundreds of milliseconds.  These calls never block (the descriptors are
 * non-blocking; /proc files are in memory): the caller waits in poll() -- releasing the GIL -- only when
 * one says it would block.
 *
 * read_file(path, limit): the first `limit` bytes of a file (a /proc file: prometheus_client's process
 * metrics).  count_dir(path): the entries of a directory, "." and ".." aside (/proc/self/fd). */
#include <sys/socket.h>

static PyObject *
accel_read_file(PyObject *module, PyObject *args)
{
    const char *path;
    Py_ssize_t limit;
    if (!PyArg_ParseTuple(args, "sn:read_file", &path, &limit)) {
        return NULL;
    }
    if (limit < 0 || limit > (1 << 20)) {
        PyErr_SetString(PyExc_ValueError, "read_file: limit must be 0..1 MiB");
        return NULL;
    }
    int fd = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK);
    if (fd < 0) {
        return PyErr_SetFromErrnoWithFilename(PyExc_OSError, path);
    }
    PyObject *out = PyBytes_FromStringAndSize(NULL, limit);
    Py_ssize_t got = 0;
    while (out != NULL && got < limit) {
        ssize_t n = read(fd, PyBytes_AS_STRING(out) + got, (size_t)(limit - got));
        if (n < 0 && errno == EINTR) {
            continue;
        }
        if (n < 0) {
            PyErr_SetFromErrnoWithFilename(PyExc_OSError, path);
            Py_CLEAR(out);
            break;
        }
        if (n == 0) {
            break;
        }
        got += n;
    }
    close(fd);
    if (out != NULL && _PyBytes_Resize(&out, got) < 0) {
        return NULL;
    }
    return out;
}

static PyObject *
accel_count_dir(PyObject *module, PyObject *args)
{
    const char *path;
    if (!PyArg_ParseTuple(args, "s:count_dir", &path)) {
        return NULL;
    }
    DIR *dir = opendir(path);
    if (dir == NULL) {
        return PyErr_SetFromErrnoWithFilename(PyExc_OSError, path);
    }
    long count = 0;
    struct dirent *entry;
    while ((entry = readdir(dir)) != NULL) {
        if (strcmp(entry->d_name, ".") != 0 && strcmp(entry->d_name, "..") != 0) {
            count++;
        }
    }
    closedir(dir);
    return PyLong_FromLong(count);
}

/* accept(fd): a connection's descriptor (non-blocking, close-on-exec), or None if none is pending.
 * recv(fd, n): up to n bytes; b"" at the end; None if nothing has arrived yet.
 * send(fd, data): how many bytes were sent; 0 if the socket's buffer is full.  close(fd). */
static PyObject *
accel_accept(PyObject *module, PyObject *arg)
{
    int fd = PyObject_AsFileDescriptor(arg);
    if (fd < 0) {
        return NULL;
    }
    int conn;
    do {
        conn = accept4(fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
    } while (conn < 0 && errno == EINTR);
    if (conn < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK || errno == ECONNABORTED) {
            Py_RETURN_NONE;
        }
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    return PyLong_FromLong(conn);
}

static PyObject *
accel_recv(PyObject *module, PyObject *args)
{
    int fd;
    Py_ssize_t size;
    if (!PyArg_ParseTuple(args, "in:recv", &fd, &size)) {
        return NULL;
    }
    if (size <= 0 || size > (1 << 20)) {
        PyErr_SetString(PyExc_ValueError, "recv: size must be 1..1 MiB");
        return NULL;
    }
    PyObject *out = PyBytes_FromStringAndSize(NULL, size);
    if (out == NULL) {
        return NULL;
    }
    ssize_t n;
    do {
        n = recv(fd, PyBytes_AS_STRING(out), (size_t)size, 0);
    } while (n < 0 && errno == EINTR);
    if (n < 0) {
        Py_DECREF(out);
        if (errno == EAGAIN || errno == EWOULDBLOCK) {
            Py_RETURN_NONE;
        }
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    if (_PyBytes_Resize(&out, n) < 0) {
        return NULL;
    }
    return out;
}

static PyObject *
accel_send(PyObject *module, PyObject *args)
{
    int fd;
    Py_buffer data;
    if (!PyArg_ParseTuple(args, "iy*:send", &fd, &data)) {
        return NULL;
    }
    ssize_t n;
    do {
        n = send(fd, data.buf, (size_t)data.len, MSG_NOSIGNAL);
    } while (n < 0 && errno == EINTR);
    PyBuffer_Release(&data);
    if (n < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK) {
            return PyLong_FromLong(0);
        }
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    return PyLong_FromSsize_t(n);
}

static PyObject *
accel_close(PyObject *module, PyObject *arg)
{
    int fd = PyObject_AsFileDescriptor(arg);
    if (fd < 0) {
        return NULL;
    }
    close(fd);  /* no retry on EINTR: on Linux the descriptor is released either way */
    Py_RETURN_NONE;
}

/* gzip(data, level): data compressed in gzip format (what gzip.compress gives), GIL held -- zlib's own
 * functions, found with dlsym in the libz.so.1 that Python's zlib module loads (no link-time dependency:
 * only the header is needed to build).  The exporter uses it for bodies small enough to compress in a
 * few milliseconds; without <zlib.h> there is no gzip() and gzip.compress (which releases the GIL) is used. */
#if defined(__has_include)
#if __has_include(<zlib.h>)
#include <dlfcn.h>
#include <zlib.h>
#define LW_ZLIB 1
#endif
#endif

#ifdef LW_ZLIB
static struct {
    int (*init)(z_streamp, int, int, int, int, int, const char *, int);
    int (*deflate)(z_streamp, int);
    int (*end)(z_streamp);
    uLong (*bound)(z_streamp, uLong);
    int state;  /* 0 not tried, 1 loaded, -1 not loadable */
} zfn;

static int
zlib_loaded(void)
{
    if (zfn.state == 0) {
        void *lib = dlopen("libz.so.1", RTLD_NOW | RTLD_LOCAL);
        zfn.state = -1;
        if (lib != NULL) {
            *(void **)&zfn.init = dlsym(lib, "deflateInit2_");
            *(void **)&zfn.deflate = dlsym(lib, "deflate");
            *(void **)&zfn.end = dlsym(lib, "deflateEnd");
            *(void **)&zfn.bound = dlsym(lib, "deflateBound");
            if (zfn.init && zfn.deflate && zfn.end && zfn.bound) {
                zfn.state = 1;
            }
        }
    }
    return zfn.state == 1;
}

static PyObject *
accel_gzip(PyObject *module, PyObject *args)
{
    Py_buffer data;
    int level;
    if (!PyArg_ParseTuple(args, "y*i:gzip", &data, &level)) {
        return NULL;
    }
    PyObject *out = NULL;
    z_stream zs;
    memset(&zs, 0, sizeof zs);
    if (!zlib_loaded()) {
        PyErr_SetString(PyExc_OSError, "gzip: libz.so.1 cannot be loaded");
    }
    else if ((uLong)data.len != (size_t)data.len || data.len > (1 << 30)) {
        PyErr_SetString(PyExc_ValueError, "gzip: data too large");
    }
    else if (zfn.init(&zs, level, Z_DEFLATED, 31, 8, Z_DEFAULT_STRATEGY, ZLIB_VERSION, (int)sizeof zs) != Z_OK) {
        PyErr_SetString(PyExc_OSError, "gzip: deflateInit2 failed");
    }
    else {
        uLong capacity = zfn.bound(&zs, (uLong)data.len) + 64;
        out = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)capacity);
        if (out != NULL) {
            zs.next_in = (Bytef *)data.buf;
            zs.avail_in = (uInt)data.len;
            zs.next_out = (Bytef *)PyBytes_AS_STRING(out);
            zs.avail_out = (uInt)capacity;
            if (zfn.deflate(&zs, Z_FINISH) != Z_STREAM_END) {
                PyErr_SetString(PyExc_OSError, "gzip: deflate did not finish");
                Py_CLEAR(out);
            }
            else if (_PyBytes_Resize(&out, (Py_ssize_t)zs.total_out) < 0) {
                out = NULL;
            }
        }
        zfn.end(&zs);
    }
    PyBuffer_Release(&data);
    return out;
}
#endif

/* stack_signal(signum) / stack_signal_off(): a gate in front of faulthandler's handler for the GIL-held
 * fallback's signal (see _gilheld).  faulthandler.register(signum, all_threads=False) writes the
 * interrupted thread's own Python stack; this gate lets it run only when that is safe: the thread holds
 * the GIL at that instant (no other thread can be running Python), and it is in a C call, not in the
 * bytecode interpreter (see below).  Otherwise the signal does nothing.  Safe by construction, not by timing: a signal that
 * arrives late (a throttled container) cannot walk frames that are changing. */
#include <errno.h>
#include <link.h>
#include <signal.h>
#include <ucontext.h>

#include <pthread.h>
#include <setjmp.h>

static volatile sig_atomic_t stack_on;
static int stack_signum;
static struct sigaction stack_previous;

/* The memory-fault guard.  The instruction check below cannot see every moment at which the frame chain is
 * being changed: a frame is cleared and popped by helpers outside the interpreter function, and clearing it
 * runs deallocators -- arbitrary C.  A walk that starts then reads memory that is being freed.  So the walk
 * runs under a SIGSEGV/SIGBUS handler of ours: a fault inside the walk jumps back out of it (the stack
 * written so far is kept, truncated; `stack_faults` counts it); any other fault goes to the handler that
 * was there before (faulthandler's, the default action).  Only one walk can be in progress: the walking
 * thread holds the GIL. */
static struct sigaction guard_previous_segv, guard_previous_bus;
static int guard_installed;
static volatile sig_atomic_t walking;
static pthread_t walking_thread;
static sigjmp_buf walk_env;
static volatile sig_atomic_t stack_faults, stack_refused;

static void
guard_handler(int signum, siginfo_t *info, void *context)
{
    if (walking && pthread_equal(walking_thread, pthread_self())) {
        walking = 0;
        stack_faults++;
        siglongjmp(walk_env, 1);
    }
    struct sigaction *previous = signum == SIGBUS ? &guard_previous_bus : &guard_previous_segv;
    if (previous->sa_flags & SA_SIGINFO) {
        previous->sa_sigaction(signum, info, context);
    }
    else if (previous->sa_handler == SIG_DFL) {  /* the default action, as if we had never been there */
        sigaction(signum, previous, NULL);
        raise(signum);
    }
    else if (previous->sa_handler != SIG_IGN) {
        previous->sa_handler(signum);
    }
}

static int
guard_on_top(int signum)
{
    struct sigaction current;
    return sigaction(signum, NULL, &current) == 0 && (current.sa_flags & SA_SIGINFO)
        && current.sa_sigaction == guard_handler;
}

static int guard_users;  /* the stack signal and the request signal: each needs the guard */

static int
guard_install(void)
{
    if (guard_installed) {
        guard_users++;
        return 0;
    }
    struct sigaction action;
    memset(&action, 0, sizeof action);
    action.sa_sigaction = guard_handler;
    action.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_NODEFER;
    sigemptyset(&action.sa_mask);
    if (sigaction(SIGSEGV, &action, &guard_previous_segv) != 0) {
        return -1;
    }
    if (sigaction(SIGBUS, &action, &guard_previous_bus) != 0) {
        sigaction(SIGSEGV, &guard_previous_segv, NULL);
        return -1;
    }
    guard_installed = 1;
    guard_users = 1;
    return 0;
}

static void
guard_remove(void)
{
    /* Put the previous handlers back only where ours is still on top: a handler installed after ours
     * (which may chain to ours: guard_handler then just passes the fault on) is left alone. */
    if (guard_installed && --guard_users > 0) {
        return;  /* the other signal still walks under it */
    }
    if (guard_installed) {
        if (guard_on_top(SIGSEGV)) {
            sigaction(SIGSEGV, &guard_previous_segv, NULL);
        }
        if (guard_on_top(SIGBUS)) {
            sigaction(SIGBUS, &guard_previous_bus, NULL);
        }
        guard_installed = 0;
    }
}
/* Holding the GIL is not enough: the thread itself may be in the middle of pushing or popping a frame
 * (an asynchronous signal lands on any instruction), and walking a half-updated frame chain crashes --
 * faulthandler.register's handler alone does, at 1000 signals/s, within seconds.  So the stack is written
 * only when the interrupted instruction is outside the bytecode interpreter (_PyEval_EvalFrameDefault):
 * the thread is in a C call (a regex, json.dumps, a garbage collection), made from a complete frame. */
static uintptr_t eval_start, eval_end;

static uintptr_t
interrupted_pc(void *context)
{
    ucontext_t *uc = (ucontext_t *)context;
#if defined(__x86_64__)
    return (uintptr_t)uc->uc_mcontext.gregs[REG_RIP];
#elif defined(__aarch64__)
    return (uintptr_t)uc->uc_mcontext.pc;
#else
    (void)uc;
    return 0;
#endif
}

static int
holds_the_gil(PyThreadState *mine)
{
#if PY_VERSION_HEX >= 0x030D0000
    PyThreadState *current = PyThreadState_GetUnchecked();
#else
    PyThreadState *current = _PyThreadState_UncheckedGet();
#endif
    return mine != NULL && current == mine;
}

/* The walk itself: `walk` (faulthandler's handler for `signum`) writes the interrupted thread's Python stack,
 * if that thread holds the GIL, is in a C call (the interrupted instruction is outside the bytecode
 * interpreter), the guard is on top, and no walk is in progress (a second signal landing in the first's
 * handler).  Returns 1 if it walked. */
static int
gated_walk(const struct sigaction *walk, int signum, siginfo_t *info, void *context)
{
    if (walking) {
        return 0;
    }
    PyThreadState *mine = PyGILState_GetThisThreadState();
    if (!holds_the_gil(mine)) {
        return 0;
    }
    uintptr_t pc = interrupted_pc(context);
    if (pc == 0 || (pc >= eval_start && pc < eval_end)) {
        return 0;
    }
    if (!guard_on_top(SIGSEGV) || !guard_on_top(SIGBUS)) {
        stack_refused++;  /* someone replaced the guard: no walk without it */
        return 0;
    }
    int walked = 0;
    if (sigsetjmp(walk_env, 1) == 0) {
        walking_thread = pthread_self();
        walking = 1;
        if (walk->sa_flags & SA_SIGINFO) {
            walk->sa_sigaction(signum, info, context);
            walked = 1;
        }
        else if (walk->sa_handler != SIG_DFL && walk->sa_handler != SIG_IGN) {
            walk->sa_handler(signum);
            walked = 1;
        }
        walking = 0;
    }
    return walked;
}

static void
stack_handler(int signum, siginfo_t *info, void *context)
{
    int saved = errno;
    if (stack_on) {
        gated_walk(&stack_previous, signum, info, context);  /* faulthandler's own handler writes it */
    }
    errno = saved;
}

/* Locate the bytecode interpreter's code (see above); 0 if it works here, else -1 with an exception set. */
static int
locate_eval(void)
{
    if (eval_end == 0) {
        void *eval = dlsym(RTLD_DEFAULT, "_PyEval_EvalFrameDefault");
        Dl_info where;
        const ElfW(Sym) *symbol = NULL;
        if (eval != NULL && dladdr1(eval, &where, (void **)&symbol, RTLD_DL_SYMENT) && symbol != NULL
                && symbol->st_size > 0) {
            eval_start = (uintptr_t)eval;
            eval_end = eval_start + symbol->st_size;
        }
    }
#if !defined(__x86_64__) && !defined(__aarch64__)
    PyErr_SetString(PyExc_RuntimeError, "the interrupted instruction cannot be read on this architecture");
    return -1;
#endif
    if (eval_end == 0) {
        PyErr_SetString(PyExc_RuntimeError, "the bytecode interpreter's code (_PyEval_EvalFrameDefault) cannot be located");
        return -1;
    }
    return 0;
}

static PyObject *
accel_stack_signal(PyObject *module, PyObject *args)
{
    int signum;
    if (!PyArg_ParseTuple(args, "i", &signum)) {
        return NULL;
    }
    if (locate_eval() < 0) {
        return NULL;
    }
    if (stack_signum != 0) {
        PyErr_SetString(PyExc_RuntimeError, "a stack signal is already registered");
        return NULL;
    }
    if (guard_install() != 0) {
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    struct sigaction action;
    memset(&action, 0, sizeof action);
    action.sa_sigaction = stack_handler;
    action.sa_flags = SA_RESTART | SA_SIGINFO;
    sigemptyset(&action.sa_mask);
    if (sigaction(signum, &action, &stack_previous) != 0) {
        PyObject *error = PyErr_SetFromErrno(PyExc_OSError);
        guard_remove();
        return error;
    }
    stack_signum = signum;
    stack_on = 1;
    Py_RETURN_NONE;
}

static PyObject *
accel_stack_signal_off(PyObject *module, PyObject *Py_UNUSED(ignored))
{
    stack_on = 0;
    if (stack_signum != 0) {
        sigaction(stack_signum, &stack_previous, NULL);
        stack_signum = 0;
        guard_remove();
    }
    Py_RETURN_NONE;
}

/* The dump-request signal (``loopwatch dump PID``, see _remote).  request_signal(signum, poke_fd) installs
 * request_handler for signum, chaining to the handler that was there (the application's, if any);
 * request_walk() puts it back on top of faulthandler.register(signum, file=<the agent's request file>), whose
 * handler becomes the walk; request_target(native_id) names the owner loop's thread; request_state() reads
 * (requests so far, when the last one arrived, the request the loop thread last wrote its stack for, whether
 * our handler is still the installed one);
 * request_signal_off() puts the previous handler back if ours is still on top.
 *
 * A request (a signal from another process, kill(2)) lands on any thread.  The handler -- async-signal-safe:
 * atomics, write(2), tgkill(2) -- stamps it, writes one byte to the watchdog's request pipe (the watchdog
 * writes the dump as soon as it runs), and forwards the signal to the owner loop's thread.  There, if that
 * thread holds the GIL in a C call (a stall no Python thread can see: a regex, a huge json.dumps), the gated
 * walk writes its own stack to the request file at once: the watchdog, which runs only when the GIL is
 * released, turns that stack into the dump.  A forwarded signal (SI_TKILL from this process) only walks;
 * the application's handler is called once per request, for the original signal. */
#include <sys/syscall.h>

static volatile sig_atomic_t req_on;
static int req_signum;
static int req_poke_fd = -1;
static volatile pid_t req_target;      /* the owner loop's thread (native id); 0: none */
static struct sigaction req_chain;     /* what was installed before loopwatch: called for each request */
static struct sigaction req_walk;      /* faulthandler's handler for the signal: writes this thread's stack */
static volatile sig_atomic_t req_has_walk;
static _Atomic int64_t req_at;         /* CLOCK_MONOTONIC ns of the last request */
static _Atomic long req_count;         /* requests received */
static _Atomic long req_walked;        /* the request count when the loop thread last wrote its stack */
static int64_t req_walked_at;          /* ns; only the loop thread writes it (in the handler) */
#define REQUEST_WALK_GAP 100000000LL   /* ns: at most 10 stacks a second, however many requests arrive */

static void
chain_to(const struct sigaction *previous, int signum, siginfo_t *info, void *context)
{
    if (previous->sa_flags & SA_SIGINFO) {
        if (previous->sa_sigaction != NULL) {
            previous->sa_sigaction(signum, info, context);
        }
    }
    else if (previous->sa_handler != SIG_DFL && previous->sa_handler != SIG_IGN && previous->sa_handler != NULL) {
        previous->sa_handler(signum);  /* a default action is not re-raised: a request never kills */
    }
}

static void
request_handler(int signum, siginfo_t *info, void *context)
{
    int saved = errno;
    pid_t self = (pid_t)syscall(SYS_gettid);
    int forwarded = info != NULL && info->si_code == SI_TKILL && info->si_pid == getpid();
    if (req_on) {
        pid_t target = req_target;
        long count = atomic_load(&req_count);
        if (!forwarded) {
            atomic_store(&req_at, mono_ns());
            count = atomic_fetch_add(&req_count, 1) + 1;
            if (req_poke_fd >= 0) {
                ssize_t n = write(req_poke_fd, "r", 1);
                (void)n;  /* the pipe is full: the watchdog is already woken */
            }
            if (target != 0 && target != self) {
                syscall(SYS_tgkill, getpid(), target, signum);
            }
        }
        if (req_has_walk && target != 0 && self == target) {
            int64_t now = mono_ns();
            if (now - req_walked_at >= REQUEST_WALK_GAP && gated_walk(&req_walk, signum, info, context)) {
                req_walked_at = now;  /* a flood of requests mid-stall writes a bounded number of stacks */
                atomic_store(&req_walked, count);
            }
        }
    }
    if (!forwarded) {
        chain_to(&req_chain, signum, info, context);
    }
    errno = saved;
}

static int
request_on_top(void)
{
    struct sigaction current;
    return req_signum != 0 && sigaction(req_signum, NULL, &current) == 0 && (current.sa_flags & SA_SIGINFO)
        && current.sa_sigaction == request_handler;
}

static PyObject *
accel_request_signal(PyObject *module, PyObject *args)
{
    int signum, poke_fd;
    if (!PyArg_ParseTuple(args, "ii", &signum, &poke_fd)) {
        return NULL;
    }
    if (req_signum != 0) {
        PyErr_SetString(PyExc_RuntimeError, "a request signal is already registered");
        return NULL;
    }
    struct sigaction action;
    memset(&action, 0, sizeof action);
    action.sa_sigaction = request_handler;
    action.sa_flags = SA_RESTART | SA_SIGINFO;
    sigemptyset(&action.sa_mask);
    req_poke_fd = poke_fd;
    req_has_walk = 0;
    req_target = 0;
    if (sigaction(signum, &action, &req_chain) != 0) {
        req_poke_fd = -1;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    req_signum = signum;
    req_on = 1;
    Py_RETURN_NONE;
}

static PyObject *
accel_request_walk(PyObject *module, PyObject *Py_UNUSED(ignored))
{
    if (req_signum == 0) {
        PyErr_SetString(PyExc_RuntimeError, "no request signal is registered");
        return NULL;
    }
    if (locate_eval() < 0) {
        return NULL;
    }
    if (guard_install() != 0) {
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    struct sigaction action;
    memset(&action, 0, sizeof action);
    action.sa_sigaction = request_handler;
    action.sa_flags = SA_RESTART | SA_SIGINFO;
    sigemptyset(&action.sa_mask);
    if (sigaction(req_signum, &action, &req_walk) != 0) {
        PyObject *error = PyErr_SetFromErrno(PyExc_OSError);
        guard_remove();
        return error;
    }
    req_has_walk = 1;
    Py_RETURN_NONE;
}

static PyObject *
accel_request_target(PyObject *module, PyObject *arg)
{
    long tid = PyLong_AsLong(arg);
    if (tid == -1 && PyErr_Occurred()) {
        return NULL;
    }
    req_target = (pid_t)tid;
    Py_RETURN_NONE;
}

static PyObject *
accel_request_state(PyObject *module, PyObject *Py_UNUSED(ignored))
{
    return Py_BuildValue("(ldlN)", atomic_load(&req_count), atomic_load(&req_at) / 1e9, atomic_load(&req_walked),
                         PyBool_FromLong(request_on_top()));
}

/* request_signal_off(): stop answering; put the previous handler back if ours is on top.  Returns True if
 * it did, False if another handler had replaced ours (left alone: ours, if that one chains to it, only
 * chains on).  In both cases the walk is forgotten; the caller unregisters faulthandler's handler first. */
static PyObject *
accel_request_signal_off(PyObject *module, PyObject *Py_UNUSED(ignored))
{
    int restored = 0;
    req_on = 0;
    if (req_signum != 0) {
        if (request_on_top()) {
            sigaction(req_signum, &req_chain, NULL);
            restored = 1;
        }
        if (req_has_walk) {
            req_has_walk = 0;
            guard_remove();
        }
        req_signum = 0;
    }
    req_target = 0;
    req_poke_fd = -1;
    return PyBool_FromLong(restored);
}

/* signal_free(signum): True if the signal's disposition is the default one --
 * nothing (Python code, faulthandler, a C library) handles it. */
static PyObject *
accel_signal_free(PyObject *module, PyObject *args)
{
    int signum;
    if (!PyArg_ParseTuple(args, "i", &signum)) {
        return NULL;
    }
    struct sigaction current;
    if (sigaction(signum, NULL, &current) != 0) {
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    int free_ = !(current.sa_flags & SA_SIGINFO) && current.sa_handler == SIG_DFL;
    return PyBool_FromLong(free_);
}

/* stack_guard(): (guard installed and on top for SIGSEGV and SIGBUS, walks cut short by a fault, walks
 * refused because another handler replaced the guard).  stack_guard_probe(): a walk that faults on purpose
 * (reads address 8) under the guard, as the signal handler runs one; True if the guard caught it. */
static PyObject *
accel_stack_guard(PyObject *module, PyObject *Py_UNUSED(ignored))
{
    int on_top = guard_installed && guard_on_top(SIGSEGV) && guard_on_top(SIGBUS);
    return Py_BuildValue("(Nii)", PyBool_FromLong(on_top), (int)stack_faults, (int)stack_refused);
}

static PyObject *
accel_stack_guard_probe(PyObject *module, PyObject *Py_UNUSED(ignored))
{
    if (!guard_installed || !guard_on_top(SIGSEGV)) {
        PyErr_SetString(PyExc_RuntimeError, "the guard is not installed");
        return NULL;
    }
    volatile int caught = 0;
    if (sigsetjmp(walk_env, 1) == 0) {
        walking_thread = pthread_self();
        walking = 1;
        volatile int *bad = (volatile int *)(uintptr_t)8;
        caught = *bad;  /* faults: the guard jumps back here with 1 */
        walking = 0;
        caught = 0;
    }
    else {
        caught = 1;
        stack_faults--;  /* the probe's own fault is not a walk's */
    }
    return PyBool_FromLong(caught);
}

static PyMethodDef module_methods[] = {
    {"stack_signal", accel_stack_signal, METH_VARARGS,
     "stack_signal(signum): gate signum's handler (faulthandler's): it runs only if this thread is parked in a C call holding the GIL"},
    {"stack_signal_off", accel_stack_signal_off, METH_NOARGS, "restore the signal's previous handler"},
    {"request_signal", accel_request_signal, METH_VARARGS,
     "request_signal(signum, poke_fd): answer dump requests on signum (chains to the previous handler)"},
    {"request_walk", accel_request_walk, METH_NOARGS,
     "put the request handler back on top of faulthandler's for the signal: the loop thread writes its stack"},
    {"request_target", accel_request_target, METH_O, "request_target(native_id): the owner loop's thread (0: none)"},
    {"request_state", accel_request_state, METH_NOARGS,
     "(requests received, monotonic s of the last, the request count the loop thread last wrote its stack for, "
     "our handler is on top)"},
    {"request_signal_off", accel_request_signal_off, METH_NOARGS,
     "stop answering; restore the previous handler if ours is on top (True if so)"},
    {"signal_free", accel_signal_free, METH_VARARGS, "signal_free(signum): nothing handles it (default disposition)"},
    {"stack_guard", accel_stack_guard, METH_NOARGS, "(guard on top, walks cut short by a fault, walks refused)"},
    {"stack_guard_probe", accel_stack_guard_probe, METH_NOARGS, "fault on purpose under the guard: True if caught"},
    {"monotonic", accel_monotonic, METH_NOARGS, "CLOCK_MONOTONIC in seconds (time.monotonic())"},
    {"thread_cpu", accel_thread_cpu, METH_NOARGS, "{tid: CPU seconds} of this process's threads, GIL held"},
    {"read_file", accel_read_file, METH_VARARGS, "read_file(path, limit): a file's first bytes, GIL held"},
    {"count_dir", accel_count_dir, METH_VARARGS, "count_dir(path): a directory's entries, GIL held"},
    {"accept", accel_accept, METH_O, "accept(fd): a non-blocking connection's fd, or None; GIL held"},
    {"recv", accel_recv, METH_VARARGS, "recv(fd, n): bytes, b'' at the end, None if none yet; GIL held"},
    {"send", accel_send, METH_VARARGS, "send(fd, data): bytes sent, 0 if the buffer is full; GIL held"},
    {"close", accel_close, METH_O, "close(fd), GIL held"},
#ifdef LW_ZLIB
    {"gzip", accel_gzip, METH_VARARGS, "gzip(data, level): gzip-compressed data, GIL held"},
#endif
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef accel_module = {
    PyModuleDef_HEAD_INIT, "loopwatch._accel", "loopwatch's compiled accelerator (see _accel.c).", -1,
    module_methods,
};

PyMODINIT_FUNC
PyInit__accel(void)
{
    zero_int = PyLong_FromLong(0);
    generation_key = PyUnicode_InternFromString("generation");
    if (zero_int == NULL || generation_key == NULL) {
        return NULL;
    }
    if (PyType_Ready(&ParkType) < 0 || PyType_Ready(&SelectClockType) < 0 || PyType_Ready(&PollClockType) < 0 || PyType_Ready(&UvClockType) < 0 ||
        PyType_Ready(&GcWatchType) < 0) {
        return NULL;
    }
    PyObject *module = PyModule_Create(&accel_module);
    if (module == NULL) {
        return NULL;
    }
    if (PyModule_AddObjectRef(module, "SelectClock", (PyObject *)&SelectClockType) < 0 ||
        PyModule_AddObjectRef(module, "PollClock", (PyObject *)&PollClockType) < 0 ||
        PyModule_AddObjectRef(module, "Park", (PyObject *)&ParkType) < 0 ||
        PyModule_AddObjectRef(module, "UvClock", (PyObject *)&UvClockType) < 0 ||
        PyModule_AddObjectRef(module, "GcWatch", (PyObject *)&GcWatchType) < 0) {
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
