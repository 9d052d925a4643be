"""Text-to-image generation: prompts -> text features -> seeded noise -> ODE solve (t: 1 -> 0) -> decode.

    pipe = Pipeline.from_bundle("path/to/model", device="cpu", dtype=torch.float32)
    result = pipe("a red circle above a blue square", steps=4, width=256, height=256, seed=0)
    result.images[0].save("out.png")

All flow math comes from rectiflow.flow (timestep_grid, solve, cfg_velocity_fn, guidance_vector). The steps
are FLUX's (BFL flux/sampling.py get_noise / prepare / get_schedule / denoise / unpack), with the solver and
guidance pluggable:

- Noise: image i of a call (images ordered prompt by prompt, `num_images_per_prompt` each) is drawn from its
  own CPU torch.Generator seeded with `seed + i`, in float32, then moved to the device and dtype: the same
  seed gives the same image on any device, whatever the batch size. Passing `generator=` instead draws all
  noise from that one generator, in order (then no per-image seeds are recorded).
- Grid: `timestep_grid(steps, shift=...)`; shift None = linear (FLUX schnell), "flux" = FLUX's
  sequence-length shift (dev), a float = SD3's static shift. Default: the model's `SamplingDefaults`.
- Guidance: `guidance` is the guidance-embedding input of guidance-distilled models (FLUX dev; ignored with
  a warning on other models). `cfg_scale != 1` runs true classifier-free guidance: the unconditional
  (negative prompt, or "") and conditional inputs go through the model as one doubled batch.
- Flow path: the network output is turned into the ODE velocity by the path the model was trained on
  (`flow_path`, from the bundle; rectiflow.flow's velocity_fn_from_model). For rectified flow (FLUX, SD3)
  that is the identity; eps / v / EDM models get their own conversion and input preconditioning.
- fp16: every velocity evaluation is checked for non-finite values, which raises a one-line error
  recommending bf16 (fp16's range, 65504, is too small for some FLUX activations); any dtype: non-finite
  final latents or images raise too.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from rectiflow.convert.bundle import SamplingDefaults, load_bundle
from rectiflow.errors import ConfigError, RectiflowError
from rectiflow.flow import (
    METHODS,
    RectifiedFlow,
    cfg_batch,
    cfg_velocity_fn,
    check_cfg_interval,
    guidance_vector,
    parse_time_shift,
    solve,
    timestep_grid,
    velocity_fn_from_model,
)
from rectiflow.flow import Path as FlowPath
from rectiflow.models.family import family_of
from rectiflow.sample.slg import SkipLayerGuidance

__all__ = ["DEFAULT", "GenerationResult", "Pipeline", "initial_noise"]

log = logging.getLogger(__name__)

# Guidance-embedding value used for a guidance-distilled model whose defaults give none (BFL cli.py: 3.5).
FALLBACK_GUIDANCE = 3.5


class _Default:
    def __repr__(self) -> str:
        return "DEFAULT"


DEFAULT: Any = _Default()  # "use the model's default" for arguments where None means something


@dataclass
class GenerationResult:
    """images: PIL images in call order (prompt by prompt); latents: the final latents [N, C, H/8, W/8]
    (float32, CPU, normalised as the autoencoder's decode() expects); settings: per-image dicts of every
    setting (what the PNG metadata records)."""

    images: list[Image.Image]
    latents: torch.Tensor
    settings: list[dict[str, Any]] = field(default_factory=list)


def initial_noise(seeds: Sequence[int] | None, n: int, channels: int, height: int, width: int,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Noise [n, channels, height, width] (latent size) in float32 on the CPU: one generator per image
    seeded with seeds[i], or `generator` for all (BFL get_noise draws bfloat16 on the device; drawing float32
    on the CPU makes images device-independent)."""
    shape = (channels, height, width)
    if generator is not None:
        return torch.randn((n, *shape), generator=generator, dtype=torch.float32)
    assert seeds is not None and len(seeds) == n
    return torch.stack([
        torch.randn(shape, generator=torch.Generator("cpu").manual_seed(int(s)), dtype=torch.float32)
        for s in seeds
    ])  # n x [C, h, w] -> [n, C, h, w]


def _to_pil(images: torch.Tensor) -> list[Image.Image]:
    """[N, 3, H, W] in [-1, 1] -> PIL RGB, as diffusers' VaeImageProcessor (denormalize: (x / 2 + 0.5)
    .clamp(0, 1); numpy_to_pil: * 255, round)."""
    x = (images.float() / 2 + 0.5).clamp(0, 1).mul(255).round().to(torch.uint8)
    arr = x.permute(0, 2, 3, 1).cpu().numpy()  # [N, 3, H, W] -> [N, H, W, 3]
    return [Image.fromarray(np.ascontiguousarray(a), mode="RGB") for a in arr]


def _step_counter(callback: Callable[[int, int], None] | None, total: int):
    """A solve() callback that reports (steps done so far, total) over several solve() calls."""
    if callback is None:
        return None
    done = 0

    def on_step(*_):
        nonlocal done
        done += 1
        callback(done, total)

    return on_step


class Pipeline:
    """transformer (Flux) + autoencoder + text encoder + sampling defaults + the flow path the transformer
    was trained on (default rectified flow); `pipe(prompts, ...)` generates."""

    def __init__(self, transformer: torch.nn.Module, autoencoder: torch.nn.Module, text_encoder: Any,
                 defaults: SamplingDefaults | None = None, *, name: str = "custom", model_hash: str = "",
                 device: str | torch.device | None = None, dtype: torch.dtype | None = None,
                 int8: bool = False, flow_path: FlowPath | None = None):
        self.transformer = transformer
        self.flow_path = flow_path or RectifiedFlow()
        self.family = family_of(transformer)  # FLUX or SD3: how to pack latents and call the transformer
        self.autoencoder = autoencoder
        self.text_encoder = text_encoder
        self.defaults = defaults or SamplingDefaults()
        self.name, self.model_hash, self.int8 = name, model_hash, int8
        self.loras: list[dict] = []  # LoRAs applied to the transformer ({"name", "scale"}), for the settings
        ref = next(autoencoder.parameters())
        self.device = torch.device(device) if device is not None else ref.device
        self.dtype = dtype or ref.dtype
        self._check_components()

    def _check_components(self) -> None:
        p = self.transformer.params
        z = self.autoencoder.params.z_channels
        if p.latent_channels != z:
            raise ConfigError(f"the transformer takes {p.latent_channels} latent channels but the "
                              f"autoencoder gives {z}; use matching components")
        txt_dim = getattr(self.text_encoder, "txt_dim", p.context_in_dim)
        vec_dim = getattr(self.text_encoder, "vec_dim", p.vec_in_dim)
        if (txt_dim, vec_dim) != (p.context_in_dim, p.vec_in_dim):
            raise ConfigError(f"the text encoder gives features ({txt_dim}, pooled {vec_dim}) but the "
                              f"transformer expects ({p.context_in_dim}, pooled {p.vec_in_dim}); "
                              "use the model's own text encoder")

    @classmethod
    def from_bundle(cls, path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, *,
                    int8: bool = False, offload: bool = False,
                    loras: Sequence[tuple[str, float]] = (), merge_loras: bool = True) -> Pipeline:
        """Load a bundle directory (see rectiflow.convert.bundle). int8: quantise the transformer's linears
        (CPU, float32 only); offload: keep transformer blocks on the CPU and stream them to `device`.
        loras: (LoRA file, scale) pairs applied to the transformer (rectiflow.convert.lora.load_lora), merged
        into its weights unless merge_loras is False (int8 always merges: it quantises merged weights)."""
        device = torch.device(device)
        if int8 and (device.type != "cpu" or dtype != torch.float32):
            raise RectiflowError("--int8 is a CPU float32 option; drop --dtype/--device or drop --int8")
        b = load_bundle(path, device="cpu" if offload else device, dtype=dtype)
        applied = []
        if loras:
            from rectiflow.convert.lora import load_lora
            from rectiflow.nn.lora import lora_names, merge_lora, remove_lora

            for lora_path, scale in loras:
                load_lora(b.transformer, lora_path, scale=scale)
                applied.append({"name": lora_names(b.transformer)[-1], "scale": float(scale)})
            if merge_loras or int8:
                merge_lora(b.transformer)
                remove_lora(b.transformer)
        if int8:
            from rectiflow.models.quantize import quantize_int8

            b.transformer = quantize_int8(b.transformer, inplace=True)
        if offload:
            from rectiflow.models.offload import enable_offload

            enable_offload(b.transformer, device)
            b.autoencoder.to(device)
            if hasattr(b.text_encoder, "to"):
                b.text_encoder.to(device)
        pipe = cls(b.transformer, b.autoencoder, b.text_encoder, b.defaults, name=b.name,
                   model_hash=b.model_hash, device=device, dtype=dtype, int8=int8, flow_path=b.flow_path)
        pipe.loras = applied
        return pipe

    # ------------------------------------------------------------------------------------------ helpers

    @property
    def downsample(self) -> int:
        """Pixels per latent cell (8 for FLUX's autoencoder: 2 ** (len(ch_mult) - 1))."""
        return 2 ** (len(self.autoencoder.params.ch_mult) - 1)

    def encode_prompts(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(txt [B, L, D], vec [B, D_vec]) on the pipeline's device and dtype."""
        enc = getattr(self.text_encoder, "encode", self.text_encoder)
        with torch.inference_mode():
            txt, vec = enc(list(prompts))
        return txt.to(self.device, self.dtype), vec.to(self.device, self.dtype)

    def image_tokens(self, lh: int, lw: int) -> int:
        """Image tokens of an lh x lw latent for this transformer (the sequence length FLUX's shift reads)."""
        return self.family.image_tokens(lh, lw, getattr(self.transformer, "params", None))

    def _check_size(self, width: int, height: int) -> None:
        m = 2 * self.downsample  # latents are packed in 2x2 patches
        for name, v in (("width", width), ("height", height)):
            if not isinstance(v, int) or v < m or v % m:
                near = max(m, round(v / m) * m) if isinstance(v, (int, float)) else m
                raise RectiflowError(f"{name} {v} is not a positive multiple of {m}; use e.g. {near}")

    # ------------------------------------------------------------------------------------------ generate

    def __call__(self, prompts: str | Sequence[str], **kwargs) -> GenerationResult:
        return self.generate(prompts, **kwargs)

    def generate(self, prompts: str | Sequence[str], *, steps: int | None = None, width: int | None = None,
                 height: int | None = None, seed: int = 0, sampler: str | None = None, shift: Any = DEFAULT,
                 guidance: Any = DEFAULT, cfg_scale: float | None = None,
                 negative_prompt: str | Sequence[str] | None = None, num_images_per_prompt: int = 1,
                 generator: torch.Generator | None = None, seeds: Sequence[int] | None = None,
                 batch_size: int | None = None,
                 prompt_embeds: tuple[torch.Tensor, torch.Tensor] | None = None,
                 skip_layer_guidance: SkipLayerGuidance | None = None,
                 cfg_interval: tuple[float, float] | None = None,
                 progress: bool = True,
                 callback: Callable[[int, int], None] | None = None) -> GenerationResult:
        """Generate `num_images_per_prompt` images per prompt; unset arguments take the model's defaults.

        Image i (in call order) uses seed `seed + i` unless `generator` is given, or `seeds[i]` when an
        explicit list (one seed per image) is given (e.g. GenEval's seeds 0..3 for every prompt).
        `batch_size` caps how many images run through the model at once (default: all); results do not
        depend on it. `prompt_embeds` = (txt [P, L, D], vec [P, D_vec]), one row per prompt, replaces the
        text encoder's output (e.g. to mix the token sequence of one prompt with the pooled vector of
        another); `prompts` then only label the results. Negative prompts are still encoded.
        `callback(done, total)` is called after every solver step (total = steps x model calls), e.g. for
        a progress bar in a server; an exception it raises aborts the generation (cancellation).
        `skip_layer_guidance`: SD3.5's skip-layer guidance (rectiflow.sample.slg), on top of CFG.
        `cfg_interval` (lo, hi): CFG only at solver times lo <= t <= hi (t = 1 is noise), the conditional
        model alone (one forward) at the others (rectiflow.flow.guidance).
        """
        d = self.defaults
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise RectiflowError("prompts must be a non-empty string or list of strings")
        steps = d.steps if steps is None else steps
        width, height = width or d.width, height or d.height
        sampler = sampler or d.sampler
        cfg_scale = d.cfg_scale if cfg_scale is None else float(cfg_scale)
        shift = d.shift if shift is DEFAULT else parse_time_shift(shift)
        if not isinstance(steps, int) or steps < 1:
            raise RectiflowError(f"steps must be an integer >= 1, got {steps!r}")
        if sampler not in METHODS:
            raise RectiflowError(f"unknown sampler {sampler!r}; choose one of {', '.join(METHODS)}")
        if num_images_per_prompt < 1:
            raise RectiflowError(f"num_images_per_prompt must be >= 1, got {num_images_per_prompt}")
        if cfg_scale < 0:
            raise RectiflowError(f"cfg scale must be >= 0, got {cfg_scale}")
        cfg_interval = check_cfg_interval(cfg_interval)
        self._check_size(width, height)
        guidance = self._resolve_guidance(guidance)
        use_cfg = cfg_scale != 1.0
        if negative_prompt is not None and not use_cfg:
            log.warning("negative prompt ignored: it needs classifier-free guidance (set --cfg above 1)")
            negative_prompt = None
        negatives = self._negatives(negative_prompt, len(prompts)) if use_cfg else None

        # prompt index of each image, prompt by prompt
        flat = [i for i in range(len(prompts)) for _ in range(num_images_per_prompt)]
        n = len(flat)
        lh, lw = height // self.downsample, width // self.downsample
        if seeds is not None:
            if generator is not None or len(seeds) != n:
                raise RectiflowError(f"seeds must list one seed per image ({n}) and excludes generator=")
            seeds = [int(x) for x in seeds]
        elif generator is None:
            seeds = [seed + i for i in range(n)]
        noise = initial_noise(seeds, n, self.autoencoder.params.z_channels, lh, lw, generator)
        ts = timestep_grid(steps, shift=shift, seq_len=self.image_tokens(lh, lw))
        txt, vec = self.encode_prompts(prompts) if prompt_embeds is None else self._given_embeds(
            prompt_embeds, len(prompts))
        neg = self.encode_prompts(negatives) if negatives is not None else None

        bs = batch_size or n
        latents = []
        chunks = range(0, n, bs)
        step_done = _step_counter(callback, steps * len(chunks))
        for s in chunks:
            idx = torch.tensor(flat[s:s + bs])
            cond = (txt[idx], vec[idx])
            uncond = (neg[0][idx], neg[1][idx]) if neg is not None else None
            latents.append(self._denoise(noise[s:s + bs], cond, uncond, ts, sampler, guidance, cfg_scale,
                                         progress, lh, lw, step_done, skip_layer_guidance, cfg_interval))
        z = torch.cat(latents)  # [N, C, lh, lw]
        images = self.decode(z)
        base = dict(steps=steps, sampler=sampler, shift=shift, guidance=guidance, cfg_scale=cfg_scale,
                    width=width, height=height, model=self.name, model_hash=self.model_hash,
                    dtype=str(self.dtype).replace("torch.", ""), int8=self.int8)
        if self.loras:
            base["loras"] = [dict(x) for x in self.loras]
        if skip_layer_guidance is not None:
            base["skip_layer_guidance"] = dataclasses.asdict(skip_layer_guidance)
        if cfg_interval is not None and use_cfg:
            base["cfg_interval"] = list(cfg_interval)
        settings = [dict(base, prompt=prompts[p], negative_prompt=negatives[p] if negatives else None,
                         seed=seeds[i] if seeds else None) for i, p in enumerate(flat)]
        return GenerationResult(images, z.float().cpu(), settings)

    def _given_embeds(self, embeds, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Check prompt_embeds = (txt [n, L, D], vec [n, D_vec]) against the transformer's input widths."""
        p = self.transformer.params
        if not (isinstance(embeds, (tuple, list)) and len(embeds) == 2
                and all(isinstance(e, torch.Tensor) for e in embeds)):
            raise RectiflowError("prompt_embeds must be a pair of tensors (txt [P, L, D], vec [P, D_vec])")
        txt, vec = embeds
        if txt.ndim != 3 or txt.shape[0] != n or txt.shape[2] != p.context_in_dim:
            raise RectiflowError(f"prompt_embeds txt has shape {tuple(txt.shape)}; expected [{n}, L, "
                                 f"{p.context_in_dim}] (one row per prompt)")
        if vec.shape != (n, p.vec_in_dim):
            raise RectiflowError(f"prompt_embeds vec has shape {tuple(vec.shape)}; "
                                 f"expected [{n}, {p.vec_in_dim}]")
        return txt.to(self.device, self.dtype), vec.to(self.device, self.dtype)

    def _resolve_guidance(self, guidance: Any) -> float | None:
        distilled = self.transformer.params.guidance_embed
        if not distilled:
            if guidance is not DEFAULT and guidance is not None:
                log.warning("guidance %s ignored: the model has no guidance embedding (use --cfg for "
                            "classifier-free guidance)", guidance)
            return None
        if guidance is DEFAULT or guidance is None:
            guidance = self.defaults.guidance if self.defaults.guidance is not None else FALLBACK_GUIDANCE
        return float(guidance)

    @staticmethod
    def _negatives(negative_prompt: str | Sequence[str] | None, n: int) -> list[str]:
        if negative_prompt is None:
            return [""] * n  # the unconditional embedding is the encoding of the empty prompt
        if isinstance(negative_prompt, str):
            return [negative_prompt] * n
        negs = list(negative_prompt)
        if len(negs) != n:
            raise RectiflowError(f"got {len(negs)} negative prompts for {n} prompts; give one or one each")
        return negs

    def velocity_fn(self, cond: tuple[torch.Tensor, torch.Tensor],
                    uncond: tuple[torch.Tensor, torch.Tensor] | None, lh: int, lw: int,
                    guidance: float | None = None, cfg_scale: float = 1.0,
                    cfg_interval: tuple[float, float] | None = None):
        """The sampling ODE's velocity in the model's space (FLUX: packed latents [B, L_img, 4C]; SD3: latents
        [B, C, lh, lw]; `self.family.pack` / `unpack` convert), velocity(x, t 0-d) for `rectiflow.flow.solve`,
        with text cond = (txt [B, L, D], vec [B, Dv]) and, when uncond is
        given, classifier-free guidance at cfg_scale (one doubled batch per evaluation; only at times inside
        cfg_interval when given, the conditional batch alone elsewhere); lh, lw: latent size
        """
        conditional = self._model_fn(*cond, lh, lw, guidance)
        if uncond is None:
            return velocity_fn_from_model(self.flow_path, conditional)
        # the doubled batch [uncond; cond], the order cfg_velocity_fn expects
        txt, vec = cfg_batch(cond[0], uncond[0]), cfg_batch(cond[1], uncond[1])
        doubled = self._model_fn(txt, vec, lh, lw, guidance)
        # CFG combines network outputs: every path's to_velocity is affine in the output (a x + b out) and
        # CFG's weights (1 - s, s) sum to 1, so that equals combining velocities (rectified flow: identity)
        guided = cfg_velocity_fn(doubled, cfg_scale, cfg_interval, conditional)
        return velocity_fn_from_model(self.flow_path, guided)

    def _model_fn(self, txt: torch.Tensor, vec: torch.Tensor, lh: int, lw: int, guidance: float | None,
                  skip_layers: Sequence[int] = ()):
        """The transformer's raw output as model_fn(x, t 0-d) for a text batch (txt [B, L, D], vec [B, Dv]);
        skip_layers: the blocks SD3.5's skip-layer guidance leaves out"""
        g = None if guidance is None else guidance_vector(guidance, txt.shape[0], self.device, self.dtype)
        skip = tuple(skip_layers)
        check = self.dtype == torch.float16

        def model_fn(xb: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            tt = t.to(self.dtype).expand(xb.shape[0])  # 0-d -> [B] (BFL: full((B,), t, img.dtype))
            v = self.family.forward(self.transformer, xb, tt, txt, vec, lh, lw, g, skip_layers=skip)
            if check and not torch.isfinite(v).all():
                raise RectiflowError("float16 overflow: the transformer produced inf/NaN; use --dtype "
                                     "bf16 (same memory, float32 range) or fp32")
            return v

        return model_fn

    def _denoise(self, noise, cond, uncond, ts, sampler, guidance, cfg_scale, progress, lh, lw,
                 step_done=None, slg=None, cfg_interval=None):
        x = self.family.pack(noise.to(self.device, self.dtype))  # [B, C, lh, lw] -> model space
        b = x.shape[0]
        velocity = self.velocity_fn(cond, uncond, lh, lw, guidance, cfg_scale, cfg_interval)
        if slg is not None:
            conditional = self._model_fn(*cond, lh, lw, guidance)
            skipping = self._model_fn(*cond, lh, lw, guidance, skip_layers=slg.layers)
            velocity = slg.velocity_fn(velocity, conditional, skipping, ts)
        with torch.inference_mode():
            x = solve(velocity, x, ts, method=sampler, progress=progress, callback=step_done)
        if not torch.isfinite(x).all():
            raise self._nonfinite("latents")
        assert x.shape[0] == b
        return self.family.unpack(x, lh, lw)  # model space -> [B, C, lh, lw]

    def _nonfinite(self, what: str) -> RectiflowError:
        if self.dtype == torch.float16:
            return RectiflowError(f"float16 overflow: the {what} contain inf/NaN; use --dtype bf16 or fp32")
        return RectiflowError(f"the {what} contain inf/NaN: the model weights are broken or do not match")

    def decode(self, z: torch.Tensor) -> list[Image.Image]:
        """Latents [B, C, h, w] -> PIL images, one at a time."""
        images = []
        with torch.inference_mode():
            for i in range(z.shape[0]):  # one at a time: decoder activations dominate memory at 1024 px
                x = self.autoencoder.decode(z[i:i + 1].to(self.device, self.dtype))  # [1, 3, H, W]
                if not torch.isfinite(x).all():
                    raise self._nonfinite("decoded images")
                images += _to_pil(x)
        return images

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> Pipeline:
        """Move every component to `device` / `dtype` (an int8 pipeline stays on the CPU in float32)."""
        if self.int8 and (dtype not in (None, torch.float32) or torch.device(device or "cpu").type != "cpu"):
            raise RectiflowError("an int8 pipeline stays on the CPU in float32; load it again without --int8")
        for m in (self.transformer, self.autoencoder, self.text_encoder):
            if hasattr(m, "to") and not (self.int8 and m is self.transformer):
                m.to(device=device, dtype=dtype)
        self.device = torch.device(device) if device is not None else self.device
        self.dtype = dtype or self.dtype
        return self
