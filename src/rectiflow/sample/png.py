"""PNG files that carry their generation parameters.

Each PNG gets two tEXt chunks:
- `parameters`: the AUTOMATIC1111 web UI convention (read by A1111, ComfyUI, civitai and most image viewers
  that show "generation data"): the prompt, then a line `Negative prompt: ...` when there is one, then a
  line of `Key: value` pairs separated by ", ", e.g.
  `Steps: 4, Sampler: euler, CFG scale: 1.0, Seed: 0, Size: 64x64, Model hash: 1a2b3c4d5e6f, Model: tiny`.
- `rectiflow`: JSON with every setting and the model identity (name + hash), the machine-readable record.

Nothing time- or machine-dependent goes into the file, so the same settings give byte-identical PNGs.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from PIL import Image
from PIL.PngImagePlugin import PngInfo

PARAMETERS_KEY = "parameters"
JSON_KEY = "rectiflow"

# A1111 labels for our setting names, in the order A1111 writes them (modules/processing.py
# create_infotext: Steps, Sampler, CFG scale, Seed, Size, Model hash, Model); ours follow.
_A1111_LABELS = [
    ("steps", "Steps"),
    ("sampler", "Sampler"),
    ("cfg_scale", "CFG scale"),
    ("seed", "Seed"),
    ("size", "Size"),
    ("model_hash", "Model hash"),
    ("model", "Model"),
    ("guidance", "Guidance"),
    ("shift", "Shift"),
    ("dtype", "Dtype"),
    ("int8", "Int8"),
]


def _a1111_value(value: Any) -> str:
    text = str(value)
    # A1111 quotes values that contain its separators (modules/generation_parameters_copypaste.py quote()).
    if any(c in text for c in ",:\n"):
        text = json.dumps(text)
    return text


def a1111_parameters(settings: Mapping[str, Any]) -> str:
    """The A1111-style `parameters` text for one image's settings (keys as in `Pipeline` results)."""
    lines = [str(settings.get("prompt", ""))]
    if settings.get("negative_prompt"):
        lines.append(f"Negative prompt: {settings['negative_prompt']}")
    values = dict(settings)
    if "width" in values and "height" in values:
        values["size"] = f"{values['width']}x{values['height']}"
    pairs = [f"{label}: {_a1111_value(values[key])}" for key, label in _A1111_LABELS
             if values.get(key) is not None and not (key == "int8" and not values[key])]
    lines.append(", ".join(pairs))
    return "\n".join(lines)


def png_info(settings: Mapping[str, Any]) -> PngInfo:
    """The two tEXt chunks (`parameters`, `rectiflow`) for one image."""
    info = PngInfo()
    info.add_text(PARAMETERS_KEY, a1111_parameters(settings))
    info.add_text(JSON_KEY, json.dumps(dict(settings), sort_keys=True, ensure_ascii=False))
    return info


def save_png(image: Image.Image, path: str | os.PathLike, settings: Mapping[str, Any]) -> Path:
    """Write `image` to `path` as PNG with both metadata chunks; returns the path."""
    path = Path(path)
    image.save(path, format="PNG", pnginfo=png_info(settings))
    return path


def png_bytes(image: Image.Image, settings: Mapping[str, Any]) -> bytes:
    """The PNG file `save_png` writes, as bytes (for serving over HTTP without a file)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=png_info(settings))
    return buf.getvalue()


def read_png_settings(path: str | os.PathLike | io.BytesIO) -> tuple[str | None, dict[str, Any] | None]:
    """(A1111 `parameters` text, rectiflow JSON settings) of a PNG (a path or a file object); None for a
    chunk that is absent."""
    with Image.open(path) as im:
        text = dict(im.text) if hasattr(im, "text") else {}
    raw = text.get(JSON_KEY)
    return text.get(PARAMETERS_KEY), (json.loads(raw) if raw is not None else None)
