"""The worker registry: ``--worker NAME`` runs ``WORKERS[NAME]`` in the child process and prints its result
as one ``RESULT {json}`` line, which the driver reads (``harness._parse_result``)."""

from __future__ import annotations

import argparse
import json

from .callgrind import worker_steps
from .harness import RESULT_PREFIX
from .hooks import worker_hooks
from .http_wrk import worker_http
from .idle import worker_idle
from .scrape import worker_scrape
from .wall import worker_wall


WORKERS = {"wall": worker_wall, "steps": worker_steps, "idle": worker_idle, "hooks": worker_hooks,
           "http": worker_http, "scrape": worker_scrape}


def run_worker(args: argparse.Namespace) -> int:
    result = WORKERS[args.worker](args)
    print(RESULT_PREFIX + json.dumps(result), flush=True)
    return 0
