"""Metrics: JSON lines always (out_dir/logs/metrics.jsonl), TensorBoard event files when available."""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

log = logging.getLogger(__name__)

__all__ = ["MetricsLogger", "read_metrics"]


def _clean(v):
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/inf; keep them readable
    return v


class MetricsLogger:
    """`log(kind, step, values)` appends {"kind", "step", "time", **values} to out_dir/logs/metrics.jsonl (or
    to `path`) and writes numeric values to TensorBoard as `<kind>/<name>`. Disabled (no files) on non-main
    ranks. Both trainers (transformer and autoencoder) log through it."""

    def __init__(self, out_dir: str | Path, tensorboard: bool = True, enabled: bool = True, *,
                 path: str | Path | None = None):
        self.enabled = enabled
        self.path = Path(path) if path is not None else Path(out_dir) / "logs" / "metrics.jsonl"
        self._tb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard not installed: JSONL only
                log.info("tensorboard is not installed; metrics go to %s only", self.path)
            else:
                self._tb = SummaryWriter(log_dir=str(self.path.parent / "tensorboard"))

    def log(self, kind: str, step: int, values: dict) -> None:
        if not self.enabled:
            return
        row = {"kind": kind, "step": int(step), "time": round(time.time(), 3)}
        row.update({k: _clean(v) for k, v in values.items()})
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(f"{kind}/{k}", v, step)

    def close(self) -> None:
        if not self.enabled:
            return
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(path: str | Path, kind: str | None = None) -> list[dict]:
    """Rows of a metrics.jsonl (optionally of one kind)."""
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return [r for r in rows if kind is None or r["kind"] == kind]
