"""Fail fast when the Hugging Face Hub cannot be reached, instead of after a minute of retries.

huggingface_hub retries a refused or timed-out connection five times with back-off (about 25 s per
file, several files per model) before transformers gives up. Before asking the Hub for a model that
is not in the local cache, one TCP connection to the endpoint (3 s at most) tells whether it can
answer at all; if not, the run stops with one line that says how to work without it.

Not probed: offline mode (HF_HUB_OFFLINE=1: the libraries use the cache and never connect), models
and datasets already in the cache (the libraries fall back to it), and machines behind a proxy (the endpoint
itself is not reachable directly there, but the proxy may be).
"""

from __future__ import annotations

import glob
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


def in_datasets_cache(repo_id: str) -> bool:
    """True when `datasets` holds a prepared copy of the Hub dataset, which load_dataset falls back to
    when the Hub does not answer (datasets.load.CachedDatasetModuleFactory: namespace___name/config/version/hash)."""
    from datasets import config
    from datasets.naming import camelcase_to_snakecase

    parts = repo_id.split("/")
    parts[-1] = camelcase_to_snakecase(parts[-1])
    root = os.path.join(os.path.expanduser(str(config.HF_DATASETS_CACHE)), "___".join(parts))
    return any(os.path.isdir(p) for p in glob.glob(os.path.join(root, "*", "*", "*")))


def check_hub_reachable(repo_id: str, what: str, hint: str, revision: str | None = None, repo_type: str = "model") -> None:
    """Raise a UserError now if `repo_id` would have to come from a Hub endpoint that cannot be reached."""
    from huggingface_hub import constants, try_to_load_from_cache

    if constants.HF_HUB_OFFLINE or any(os.environ.get(v) for v in PROXY_VARIABLES):
        return
    try:
        if repo_type == "dataset":
            from datasets import config

            if config.HF_HUB_OFFLINE or in_datasets_cache(repo_id):  # HF_DATASETS_OFFLINE counts too
                return
        elif isinstance(try_to_load_from_cache(repo_id, "config.json", revision=revision), str):
            return
    except Exception:  # an id the cache cannot even look up: let the loader say what is wrong with it
        return
    reason = endpoint_error(constants.ENDPOINT)
    if reason:
        raise UserError(f"could not reach the Hugging Face Hub at {constants.ENDPOINT} ({reason}) to download "
                        f"{what} '{repo_id}', which is not in the local cache. {hint}")
