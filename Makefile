# The two commands of the README's quickstart:
#   make demo   -- set everything up and run the main demo
#   make test   -- set everything up and run all the tests (what .ci/run calls)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup system demo test mincompat soak compat asyncio-suite bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: setup.cfg setup.py pyproject.toml loopwatch/_accel.c
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

# System packages from Debian's archive, when missing: prometheus/promtool for the tests, wrk and valgrind
# for the benchmark (tools/system-packages; as root, or with passwordless sudo).
system:
	tools/system-packages

demo: setup
	$(BIN)/python examples/demo.py

test: setup
	tools/system-packages test
	$(BIN)/python -m pytest
	$(MAKE) --no-print-directory mincompat

# The declared minimum version of every runtime dependency (setup.cfg's install_requires, ">=" read as
# "=="), in its own venv: install, the exporter, stalls, dumps and threads, end to end.
MIN_VENV ?= .venv-min
# The [otel] extra's declared minimum (setup.cfg), and the instrumentation release made with it.
OTEL_MIN := $(shell sed -n '/^otel =/,/^[a-z]/s/^ *opentelemetry-sdk>=\([0-9.]*\).*/\1/p' setup.cfg)
OTEL_MIN_CONTRIB ?= 0.53b0
MIN_TESTS ?= tests/test_lifecycle.py tests/test_e2e_stalls.py tests/test_dumps.py tests/test_port_range.py \
	tests/test_threads.py tests/test_config.py tests/test_request_context.py tests/test_otel_export.py
mincompat: setup
	@[ -x $(MIN_VENV)/bin/python ] || $(PYTHON) -m venv $(MIN_VENV)
	$(MIN_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(MIN_VENV)/bin/python -m pip install --quiet -e '.[dev]'
	$(MIN_VENV)/bin/python -m pip install --quiet $$(sed -n '/^install_requires =/,/^$$/s/^ *\([A-Za-z0-9_.-]*\)>=\([0-9.]*\).*/\1==\2/p' setup.cfg) \
		$$(sed -n '/^otel =/,/^[a-z]/s/^ \+\(opentelemetry-[a-z-]*\)>=\([0-9.]*\).*/\1==\2/p' setup.cfg) \
		opentelemetry-proto==$(OTEL_MIN) opentelemetry-instrumentation-fastapi==$(OTEL_MIN_CONTRIB)
	$(MIN_VENV)/bin/python -c 'import importlib.metadata as m; print("mincompat:", *(f"{d}=={m.version(d)}" for d in ("prometheus-client", "psutil", "structlog", "opentelemetry-sdk", "opentelemetry-exporter-otlp-proto-http", "opentelemetry-instrumentation-fastapi")))'
	$(MIN_VENV)/bin/python -m pytest -q -p no:cacheprovider $(MIN_TESTS)

# The soak: ten minutes of thread, loop, task, executor and pool churn, scraped 5 times a second (make test
# runs the same for 60 s): no new series after warm-up, errors_total 0, RSS growth < 5 MB.
soak: setup
	tools/system-packages test
	LOOPWATCH_SOAK_SECONDS=600 $(BIN)/python -m pytest -q -p no:cacheprovider tests/test_soak.py

# The core suite on the newer CPythons this machine has (pyenv's 3.12/3.13), each in its own venv:
# loopwatch feature-detects asyncio internals, and this proves it on more than one version.
COMPAT_PYTHONS ?= $(wildcard $(HOME)/.pyenv/versions/3.12*/bin/python3 $(HOME)/.pyenv/versions/3.13*/bin/python3)
COMPAT_TESTS ?= tests/test_config.py tests/test_dumps.py tests/test_watchdog.py tests/test_e2e_stalls.py \
	tests/test_slow.py tests/test_lifecycle.py tests/test_threads.py tests/test_tasks.py tests/test_scrape.py \
	tests/test_fallback_safety.py tests/test_cli_run.py tests/test_remote_dump.py tests/test_console.py \
	tests/test_incidents.py tests/test_request_context.py tests/test_otel_export.py

compat:
	@if [ -z "$(COMPAT_PYTHONS)" ]; then echo "compat: no CPython 3.12/3.13 found; nothing to do"; fi
	@set -e; for py in $(COMPAT_PYTHONS); do \
		v=$$($$py -c 'import sys; print("%d.%d" % sys.version_info[:2])'); \
		echo "== compat: Python $$v"; \
		[ -x .venv-$$v/bin/python ] || $$py -m venv .venv-$$v; \
		.venv-$$v/bin/python -m pip install --quiet --upgrade pip; \
		.venv-$$v/bin/python -m pip install --quiet -e '.[dev]'; \
		.venv-$$v/bin/python -m pytest -q -p no:cacheprovider $(COMPAT_TESTS); \
	done

# CPython's own test_asyncio on every CPython 3.11-3.13 here, without and with loopwatch installed (from a
# sitecustomize, in every process): same outcome for every test, no test slower by more than a constant.
SUITE_PYTHONS ?= $(wildcard $(HOME)/.pyenv/versions/3.12*/bin/python3 $(HOME)/.pyenv/versions/3.13*/bin/python3)

asyncio-suite: setup
	@set -e; pythons="$(BIN)/python"; for py in $(SUITE_PYTHONS); do \
		v=$$($$py -c 'import sys; print("%d.%d" % sys.version_info[:2])'); \
		[ -x .venv-$$v/bin/python ] || $$py -m venv .venv-$$v; \
		.venv-$$v/bin/python -m pip install --quiet -e . ; \
		pythons="$$pythons .venv-$$v/bin/python"; \
	done; \
	$(BIN)/python tools/cpython_asyncio.py $$(for p in $$pythons; do printf -- '--python %s ' $$p; done)

bench: setup
	tools/system-packages bench
	$(BIN)/python -m benchmarks.overhead

clean:
	rm -rf $(VENV) .venv-3.* $(MIN_VENV) build *.egg-info .pytest_cache
