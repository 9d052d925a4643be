"""Start `rectiflow serve`: build the job manager and the app over models loaded once
(rectiflow.sample.model_ids.load_pipelines), run uvicorn."""

from __future__ import annotations

import ipaddress
import logging
from typing import Any

from rectiflow.web.schemas import Limits

log = logging.getLogger(__name__)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(pipelines: dict[str, Any], *, host: str = "127.0.0.1", port: int = 8000, queue_size: int = 16,
          workers: int = 1, max_batch: int = 1, store_mb: float = 256, limits: Limits | None = None,
          loras: list[str] = (), log_level: str = "info") -> None:
    """Run the server until interrupted (Ctrl-C stops it after the running batch)."""
    import uvicorn

    from rectiflow import __version__
    from rectiflow.eval.compare import verdict
    from rectiflow.web.app import create_app
    from rectiflow.web.jobs import ImageStore, JobManager
    from rectiflow.web.loras import load_server_loras

    load_server_loras(pipelines, list(loras))

    manager = JobManager(pipelines, ImageStore(int(store_mb * 2**20)), queue_size=queue_size,
                         workers=workers, max_batch=max_batch,
                         settings_extra={"rectiflow_version": __version__}, annotate=verdict)
    app = create_app(manager, limits)
    if not is_loopback(host):
        log.warning("listening on %s: anyone who can reach this machine can use the server (there is no "
                    "authentication); the default, 127.0.0.1, keeps it to this machine", host)
    uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=False)
