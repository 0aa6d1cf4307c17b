"""Fail fast when the Hugging Face Hub cannot be reached, instead of after a minute of retries.

huggingface_hub retries a refused or timed-out connection five times with back-off (about 25 s per
file, several files per model) before transformers gives up. Before asking the Hub for a model that
is not in the local cache, one TCP connection to the endpoint (3 s at most) tells whether it can
answer at all; if not, the run stops with one line that says how to work without it.

Not probed: offline mode (HF_HUB_OFFLINE=1: the libraries use the cache and never connect), models
already in the cache (the libraries fall back to it), and machines behind a proxy (the endpoint
itself is not reachable directly there, but the proxy may be).
"""

from __future__ import annotations

import os
import socket
from urllib.parse import urlsplit

from pipelines.errors import UserError

PROXY_VARIABLES = ("HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY", "https_proxy", "http_proxy", "all_proxy")


def endpoint_error(endpoint: str, timeout: float = 3.0) -> str | None:
    """None when a TCP connection to the endpoint's host opens, else the reason it did not."""
    parts = urlsplit(endpoint)
    if not parts.hostname:
        return f"{endpoint!r} is not an http(s) URL"
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((parts.hostname, port), timeout=timeout).close()
    except OSError as e:
        return e.strerror or type(e).__name__
    return None


def check_hub_reachable(repo_id: str, what: str, hint: str, revision: str | None = None) -> None:
    """Raise a UserError now if `repo_id` would have to come from a Hub endpoint that cannot be reached."""
    from huggingface_hub import constants, try_to_load_from_cache

    if constants.HF_HUB_OFFLINE or any(os.environ.get(v) for v in PROXY_VARIABLES):
        return
    try:
        if isinstance(try_to_load_from_cache(repo_id, "config.json", revision=revision), str):
            return
    except Exception:  # an id the cache cannot even look up: let the loader say what is wrong with it
        return
    reason = endpoint_error(constants.ENDPOINT)
    if reason:
        raise UserError(f"could not reach the Hugging Face Hub at {constants.ENDPOINT} ({reason}) to download "
                        f"{what} '{repo_id}', which is not in the local cache. {hint}")
