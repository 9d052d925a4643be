"""LoRAs in `rectiflow serve`: loaded once at start-up onto every served model they fit (unmerged, off), and
switched on per job by server-side id with the requested scales (rectiflow.convert.lora.load_lora,
rectiflow.nn.lora.enable_lora / set_lora_scale). Requests never name a file.

The adapters live in the shared transformer, so a pipeline that has any is used by one job at a time
(JobManager holds a lock per model); jobs with different LoRA sets never share a model call (the LoRAs are
part of the batch key).
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

from rectiflow.errors import ConfigError, FormatError, RectiflowError
from rectiflow.sample.model_ids import parse_model_spec

log = logging.getLogger(__name__)


def load_server_loras(pipelines: dict[str, Any], specs: list[str]) -> dict[str, list[str]]:
    """Load every "ID=PATH" LoRA onto each pipeline it fits, switched off; {model id: [LoRA ids]}. A LoRA
    that fits no served model is an error."""
    from rectiflow.convert.lora import load_lora
    from rectiflow.nn.lora import enable_lora

    available: dict[str, list[str]] = {mid: [] for mid in pipelines}
    for spec in specs:
        lora_id, path = parse_model_spec(spec)
        if path is None:
            raise ConfigError(f"--lora {spec}: give ID=PATH (or a PATH) of a LoRA file")
        if any(lora_id in ids for ids in available.values()):
            raise ConfigError(f"LoRA id {lora_id!r} is given twice; name them apart with ID=PATH")
        reasons = []
        for mid, pipe in pipelines.items():
            try:
                load_lora(pipe.transformer, path, name=lora_id)
            except FormatError as e:
                reasons.append(f"{mid}: {e}")
                continue
            enable_lora(pipe.transformer, lora_id, enabled=False)
            available[mid].append(lora_id)
        if not any(lora_id in ids for ids in available.values()):
            raise FormatError(f"LoRA {lora_id!r} fits none of the served models ({'; '.join(reasons)})")
        for reason in reasons:
            log.warning("LoRA %s not available for %s", lora_id, reason)
    return available


@contextlib.contextmanager
def activated(pipe: Any, loras: tuple[tuple[str, float], ...]):
    """Switch exactly `loras` ((id, scale) pairs) on for the duration; the images' settings record them
    (Pipeline.loras). The caller holds the pipeline's lock."""
    from rectiflow.nn.lora import enable_lora, has_lora, lora_names, set_lora_scale

    if not loras and not has_lora(pipe.transformer):
        yield
        return
    known = set(lora_names(pipe.transformer))
    unknown = [lid for lid, _ in loras if lid not in known]
    if unknown:
        raise RectiflowError(f"LoRA(s) {unknown} are not loaded on this model")
    before = pipe.loras
    try:
        for lid, scale in loras:
            set_lora_scale(pipe.transformer, lid, scale)
            enable_lora(pipe.transformer, lid, enabled=True)
        pipe.loras = [*before, *({"name": lid, "scale": float(scale)} for lid, scale in loras)]
        yield
    finally:
        for lid, _ in loras:
            enable_lora(pipe.transformer, lid, enabled=False)
        pipe.loras = before
