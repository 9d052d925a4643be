"""What `POST /v1/generate` accepts: the request body (pydantic, unknown fields refused) and the server's
limits.

The body's field names follow AUTOMATIC1111's /sdapi/v1/txt2img where they mean the same thing (prompt,
negative_prompt, seed, steps, width, height, n_iter -> n) and `rectiflow generate`'s options otherwise
(sampler, shift, cfg, guidance). Every field but `prompt` is optional; unset ones take the model's defaults.
Models are named by the ids the server was started with, never by a path.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from rectiflow.errors import ConfigError
from rectiflow.flow import METHODS
from rectiflow.sample.model_ids import MODEL_ID_PATTERN

# Number.MAX_SAFE_INTEGER: larger seeds would not survive a round trip through the page's JavaScript.
MAX_SEED = 2**53 - 1
SAMPLER_NAMES = METHODS  # the ODE solvers (owned by rectiflow.flow.solvers)


@dataclass(frozen=True)
class Limits:
    """Per-request caps. max_cost bounds width x height x steps x n (pixels x steps x images): the default
    allows one 1024x1024 image at 16 steps, or 64x64 images at 64 steps 8 at a time."""

    max_prompt_chars: int = 2000  # T5's 512 tokens are roughly 2000 characters of English
    max_steps: int = 100
    max_n: int = 8
    max_side: int = 2048
    max_cost: int = 1024 * 1024 * 16
    max_body_bytes: int = 2 * 2**20  # a request body above this is refused (413) before it is parsed
    max_loras: int = 4

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"server limit {name} must be a positive integer, got {value!r}")
        if self.max_side < 16:
            raise ConfigError(f"max_side must be >= 16, got {self.max_side}")

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


class LoraRef(BaseModel):
    """A LoRA the server was started with (`--lora ID=PATH`), by id, and its scale."""

    model_config = ConfigDict(extra="forbid")

    id: Annotated[str, Field(pattern=MODEL_ID_PATTERN)]
    scale: Annotated[float, Field(ge=-10, le=10)] = 1.0


def request_model(limits: Limits) -> type[BaseModel]:
    """The request body class for these limits (so that the OpenAPI schema shows the server's real caps)."""
    prompt_text = Annotated[str, Field(max_length=limits.max_prompt_chars)]
    flow_time = Annotated[float, Field(ge=0, le=1)]

    class GenerateRequest(BaseModel):
        """One prompt, `n` images (seeds seed, seed + 1, ...), one model."""

        model_config = ConfigDict(extra="forbid")

        prompt: Annotated[str, Field(min_length=1, max_length=limits.max_prompt_chars)]
        negative_prompt: prompt_text | None = None
        seed: Annotated[int, Field(ge=0, le=MAX_SEED)] | None = Field(
            None, description="seed of the first image; image i uses seed + i (unset: a random seed)")
        steps: Annotated[int, Field(ge=1, le=limits.max_steps)] | None = None
        sampler: Literal[SAMPLER_NAMES] | None = None  # type: ignore[valid-type]
        shift: Literal["none", "flux"] | Annotated[float, Field(gt=0, le=1000)] | None = Field(
            None, description="time shift: none, flux (resolution-dependent) or SD3's alpha")
        cfg: Annotated[float, Field(ge=0, le=50)] | None = Field(
            None, description="classifier-free guidance scale (1 = off)")
        cfg_interval: tuple[flow_time, flow_time] | None = Field(
            None, description="[lo, hi]: CFG only at flow times lo <= t <= hi (1 = noise)")
        guidance: Annotated[float, Field(ge=0, le=50)] | None = Field(
            None, description="guidance-embedding value (guidance-distilled models such as FLUX dev)")
        width: Annotated[int, Field(ge=16, le=limits.max_side, multiple_of=16)] | None = None
        height: Annotated[int, Field(ge=16, le=limits.max_side, multiple_of=16)] | None = None
        n: Annotated[int, Field(ge=1, le=limits.max_n)] = 1
        model: Annotated[str, Field(pattern=MODEL_ID_PATTERN)] | None = Field(
            None, description="a model id from GET /v1/models (unset: the first one)")
        loras: Annotated[list[LoraRef], Field(max_length=limits.max_loras)] = Field(
            default_factory=list, description="LoRAs by the ids GET /v1/models lists for the model")

        @model_validator(mode="after")
        def _last_seed_fits(self):
            if self.seed is not None and self.seed + self.n - 1 > MAX_SEED:
                raise ValueError(f"seed + n - 1 must be <= {MAX_SEED}")
            return self

        @field_validator("cfg_interval")
        @classmethod
        def _interval_ordered(cls, v):
            if v is not None and v[0] > v[1]:
                raise ValueError("cfg_interval must be [lo, hi] with lo <= hi")
            return v

    return GenerateRequest
