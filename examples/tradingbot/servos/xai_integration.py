"""Client of the AI API that scores trading signals.

``query_xai`` is an ordinary *synchronous* HTTP client -- the shape of the production bot's

    response = requests.post(f"{self.xai_base_url}/chat/completions", headers=headers,
                             json=payload, timeout=10)

(``urllib`` here, to need no third-party package).  There is nothing wrong with it in a worker thread;
the bug is calling it directly from a coroutine (see ``handlers/commands.py``): the event loop then
waits for the API's answer, and so does everything else the service does.
"""

from __future__ import annotations

import json
import urllib.request
from typing import Any


def query_xai(prompt: str, *, base_url: str, timeout: float = 10.0) -> dict[str, Any]:
    """POST ``prompt`` to ``{base_url}/chat/completions`` and return the decoded JSON answer.

    Blocks the calling thread until the API answers (or ``timeout`` seconds pass).
    """
    payload = {"model": "grok-beta", "messages": [{"role": "user", "content": prompt}]}
    request = urllib.request.Request(
        f"{base_url}/chat/completions",
        data=json.dumps(payload).encode(),  # a body makes it a POST
        headers={"Content-Type": "application/json", "Authorization": "Bearer demo-key"},
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:  # blocks until the API answers
        return json.load(response)
