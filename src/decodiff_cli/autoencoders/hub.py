"""The model hub, asked only when it answers: an offline machine fails in seconds, not minutes.

huggingface_hub retries an unreachable host for a minute or more; a cron job or a factory PC
without network should hear at once which autoencoders work offline.
"""

from __future__ import annotations

import os
import socket
import threading
from urllib.parse import urlparse

from decodiff_cli.autoencoders.base import AutoencoderUnavailable

PROBE_SECONDS = 5.0
OFFLINE_CHOICES = ("use --autoencoder taef2 (packaged with decodiff, the default), --autoencoder pixel "
                   "(no weights), or a local folder or .safetensors file of autoencoder weights")


def reachable(timeout: float = PROBE_SECONDS) -> bool:
    """Can a TCP connection to the hub's endpoint be opened within ``timeout`` seconds?"""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    # Behind a proxy the hub is reached through it: probe the proxy, not the hub.
    for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy") if url.scheme == "https" else ("HTTP_PROXY", "http_proxy"):
        if os.environ.get(name):
            url = urlparse(os.environ[name] if "://" in os.environ[name] else "http://" + os.environ[name])
            break
    port = url.port or (443 if url.scheme == "https" else 80)
    result: list[bool] = []

    def probe() -> None:  # name resolution has no timeout of its own, hence the thread
        try:
            socket.create_connection((url.hostname or "", port), timeout=timeout).close()
            result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(result and result[0])


def unavailable(spec: str, why: str) -> AutoencoderUnavailable:
    return AutoencoderUnavailable(f"could not load the autoencoder {spec!r} ({why}); {OFFLINE_CHOICES}")


def download(repo: str, filename: str) -> str:
    """A file of a hub repository: from the local cache when the hub cannot be reached."""
    from huggingface_hub import hf_hub_download

    online = reachable()
    try:
        return hf_hub_download(repo, filename, local_files_only=not online)
    except Exception as err:  # offline and not cached, no such repo or file: one sentence
        raise unavailable(repo, reason(online, err)) from None


def reason(online: bool, err: Exception) -> str:
    if not online:
        return "the model hub cannot be reached and it is not in the local cache"
    return f"{type(err).__name__} from the model hub"
