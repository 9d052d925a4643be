"""The generation pipeline against a hand-written FLUX sampling loop, CFG, seeds, dtypes and bad input."""

import dataclasses
import logging

import numpy as np
import pytest
import torch

from rectiflow.convert.autoencoder import build_autoencoder
from rectiflow.convert.bundle import SamplingDefaults
from rectiflow.convert.transformer import build_transformer
from rectiflow.errors import RectiflowError
from rectiflow.flow import solver_nfe, timestep_grid
from rectiflow.models.text import load_text_encoder
from rectiflow.models.transformer import TRANSFORMER_PRESETS, image_ids, pack, text_ids, unpack
from rectiflow.sample import DEFAULT, Pipeline

PROMPTS = ["a red circle", "two blue squares"]


@pytest.fixture(scope="module")
def encoder():
    return load_text_encoder("minilm", device="cpu", dtype=torch.float32)


def _pipe(encoder, guidance_embed=False, steps=3, scale=1.0, seed=0):
    torch.manual_seed(seed)
    params = dataclasses.replace(TRANSFORMER_PRESETS["micro"], guidance_embed=guidance_embed)
    t = build_transformer(params).eval()
    if scale != 1.0:
        with torch.no_grad():
            for p in t.parameters():
                p.mul_(scale)
    ae = build_autoencoder("tiny").eval()
    return Pipeline(t, ae, encoder, SamplingDefaults(steps=steps, width=32, height=48), name="micro")


def _hand_loop(pipe, prompts, n, seed, steps, h, w, guidance=None, cfg_scale=1.0,
               cfg_interval=(0.0, 1.0)):
    """FLUX sampling written out: per-image seeded noise, pack, linear grid, Euler x += (t_next - t) v."""
    model, ae, enc = pipe.transformer, pipe.autoencoder, pipe.text_encoder
    lh, lw = h // 8, w // 8
    with torch.inference_mode():
        txt, vec = enc.encode(prompts)
        txt, vec = txt.repeat_interleave(n, 0), vec.repeat_interleave(n, 0)  # prompt by prompt
        b = txt.shape[0]
        noise = torch.stack([torch.randn(ae.params.z_channels, lh, lw,
                                         generator=torch.Generator().manual_seed(seed + i))
                             for i in range(b)])
        x = pack(noise)
        u_txt, u_vec = enc.encode([""] * b)
        g = torch.full((b,), guidance) if guidance is not None else None

        def v(x, t, txt_, vec_):
            tt = torch.full((b,), t, dtype=torch.float32)
            return model(img=x, img_ids=image_ids(b, lh, lw), txt=txt_, txt_ids=text_ids(b, txt_.shape[1]),
                         timesteps=tt, y=vec_, guidance=g)

        ts = torch.linspace(1, 0, steps + 1, dtype=torch.float64).tolist()
        for t, t_next in zip(ts[:-1], ts[1:]):
            vel = v(x, t, txt, vec)
            if cfg_scale != 1.0 and cfg_interval[0] <= t <= cfg_interval[1]:
                vu = v(x, t, u_txt, u_vec)
                vel = vu + cfg_scale * (vel - vu)
            x = x + (t_next - t) * vel
        z = unpack(x, lh, lw)
        # one image at a time, as the pipeline decodes (a batched conv may round differently)
        img = torch.cat([ae.decode(z[i:i + 1]) for i in range(b)])
    pixels = ((img / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return z, pixels


def test_pipeline_equals_hand_written_euler_loop(encoder):
    pipe = _pipe(encoder)
    res = pipe(PROMPTS, seed=5, num_images_per_prompt=2, progress=False)
    z, pixels = _hand_loop(pipe, PROMPTS, 2, 5, 3, 48, 32)
    assert res.latents.shape == (4, 16, 6, 4)
    assert torch.equal(res.latents, z)
    assert len(res.images) == 4 and res.images[0].size == (32, 48)
    for im, px in zip(res.images, pixels):
        assert np.array_equal(np.asarray(im), px)
    assert [s["seed"] for s in res.settings] == [5, 6, 7, 8]
    assert [s["prompt"] for s in res.settings] == [PROMPTS[0]] * 2 + [PROMPTS[1]] * 2
    assert res.settings[0]["steps"] == 3 and res.settings[0]["model"] == "micro"


def test_seeds_are_per_image_and_batch_independent(encoder):
    pipe = _pipe(encoder)
    a = pipe(PROMPTS[0], seed=3, num_images_per_prompt=3, progress=False)
    b = pipe(PROMPTS[0], seed=3, num_images_per_prompt=3, progress=False)
    assert torch.equal(a.latents, b.latents)
    third = pipe(PROMPTS[0], seed=5, progress=False)  # image 2 of the first call used seed 3 + 2
    torch.testing.assert_close(third.latents[0], a.latents[2], rtol=1e-5, atol=1e-5)
    chunked = pipe(PROMPTS[0], seed=3, num_images_per_prompt=3, batch_size=2, progress=False)
    torch.testing.assert_close(chunked.latents, a.latents, rtol=1e-5, atol=1e-5)
    other = pipe(PROMPTS[0], seed=4, progress=False)
    assert not torch.equal(other.latents[0], a.latents[0])
    g = pipe(PROMPTS[0], generator=torch.Generator().manual_seed(3), progress=False)
    assert g.settings[0]["seed"] is None


def test_cfg_doubled_batch_equals_two_calls_and_scale_one_is_conditional(encoder, caplog):
    pipe = _pipe(encoder)
    guided = pipe(PROMPTS, seed=1, cfg_scale=4.0, progress=False)
    z, _ = _hand_loop(pipe, PROMPTS, 1, 1, 3, 48, 32, cfg_scale=4.0)
    torch.testing.assert_close(guided.latents, z, rtol=1e-5, atol=1e-5)
    plain = pipe(PROMPTS, seed=1, progress=False)
    assert not torch.allclose(plain.latents, guided.latents)
    with caplog.at_level(logging.WARNING):
        one = pipe(PROMPTS, seed=1, cfg_scale=1.0, negative_prompt="blurry", progress=False)
    assert torch.equal(one.latents, plain.latents)
    assert "negative prompt ignored" in caplog.text
    neg = pipe(PROMPTS, seed=1, cfg_scale=4.0, negative_prompt="blurry", progress=False)
    assert not torch.allclose(neg.latents, guided.latents)  # the negative prompt replaces ""
    assert neg.settings[0]["negative_prompt"] == "blurry" and neg.settings[0]["cfg_scale"] == 4.0


def test_cfg_interval_guides_only_inside_and_saves_the_other_forwards(encoder):
    pipe = _pipe(encoder)
    calls = _record_calls(pipe.transformer)
    # 3 steps: t = 1, 2/3, 1/3; (0.5, 1) guides the first two, the third runs the conditional model alone
    res = pipe(PROMPTS, seed=1, cfg_scale=4.0, cfg_interval=(0.5, 1.0), progress=False)
    assert [c["img"].shape[0] for c in calls] == [4, 4, 2]  # PROMPTS: 2; doubled, doubled, plain
    z, _ = _hand_loop(pipe, PROMPTS, 1, 1, 3, 48, 32, cfg_scale=4.0, cfg_interval=(0.5, 1.0))
    torch.testing.assert_close(res.latents, z, rtol=1e-5, atol=1e-5)
    assert res.settings[0]["cfg_interval"] == [0.5, 1.0]
    everywhere = pipe(PROMPTS, seed=1, cfg_scale=4.0, cfg_interval=(0.0, 1.0), progress=False)
    assert torch.equal(everywhere.latents, pipe(PROMPTS, seed=1, cfg_scale=4.0, progress=False).latents)
    nowhere = pipe(PROMPTS, seed=1, cfg_scale=4.0, cfg_interval=(0.0, 0.0), progress=False)  # t = 0 never
    assert torch.equal(nowhere.latents, pipe(PROMPTS, seed=1, progress=False).latents)
    assert not torch.allclose(res.latents, everywhere.latents)
    assert not torch.allclose(res.latents, nowhere.latents)
    assert "cfg_interval" not in pipe(PROMPTS, seed=1, cfg_interval=(0.5, 1.0), progress=False).settings[0]


def _record_calls(model):
    calls = []
    model.register_forward_pre_hook(lambda m, a, kw: calls.append(kw), with_kwargs=True)
    return calls


def test_guidance_distilled_model_gets_flux_shift_and_guidance(encoder):
    pipe = _pipe(encoder, guidance_embed=True, steps=4)
    pipe.defaults = SamplingDefaults(steps=4, width=32, height=48, shift="flux", guidance=2.5)
    calls = _record_calls(pipe.transformer)
    res = pipe(PROMPTS[0], progress=False)
    grid = timestep_grid(4, shift="flux", seq_len=(6 // 2) * (4 // 2))
    got = [float(kw["timesteps"][0]) for kw in calls]
    assert got == pytest.approx(grid[:-1].tolist(), abs=1e-7)
    assert all(float(kw["guidance"][0]) == 2.5 for kw in calls)
    z, _ = _hand_loop(pipe, PROMPTS[:1], 1, 0, 4, 48, 32, guidance=2.5)
    assert not torch.allclose(res.latents, z)  # the hand loop is unshifted: the shift really changed things
    calls.clear()
    pipe(PROMPTS[0], shift=None, guidance=7.0, progress=False)
    assert [float(kw["timesteps"][0]) for kw in calls] == pytest.approx([1.0, 0.75, 0.5, 0.25])
    assert float(calls[0]["guidance"][0]) == 7.0


def test_guidance_on_model_without_embedding_warns(encoder, caplog):
    pipe = _pipe(encoder)
    calls = _record_calls(pipe.transformer)
    with caplog.at_level(logging.WARNING):
        res = pipe(PROMPTS[0], guidance=3.5, progress=False)
    assert "no guidance embedding" in caplog.text
    assert calls[0]["guidance"] is None and res.settings[0]["guidance"] is None


@pytest.mark.parametrize("method", ["heun", "midpoint", "rk4"])
def test_every_solver_runs_with_its_nfe(encoder, method):
    pipe = _pipe(encoder, steps=2)
    calls = _record_calls(pipe.transformer)
    res = pipe(PROMPTS[0], sampler=method, progress=False)
    assert len(calls) == solver_nfe(method, timestep_grid(2))
    assert torch.isfinite(res.latents).all() and res.settings[0]["sampler"] == method


def test_fp16_overflow_is_a_clear_error_and_bf16_works(encoder):
    pipe = _pipe(encoder, scale=1e4).to(dtype=torch.float16)
    with pytest.raises(RectiflowError, match="float16 overflow.*bf16"):
        pipe(PROMPTS[0], progress=False)
    ok = _pipe(encoder).to(dtype=torch.bfloat16)
    res = ok(PROMPTS[0], progress=False)
    assert torch.isfinite(res.latents).all() and res.settings[0]["dtype"] == "bfloat16"
    half = _pipe(encoder).to(dtype=torch.float16)
    ref = _pipe(encoder)(PROMPTS[0], progress=False)
    torch.testing.assert_close(half(PROMPTS[0], progress=False).latents, ref.latents, rtol=0.05, atol=0.05)


@pytest.mark.parametrize("kwargs, match", [
    (dict(width=100), "width 100 is not a positive multiple of 16; use e.g. 96"),
    (dict(height=8), "height 8 is not a positive multiple of 16"),
    (dict(steps=0), "steps must be an integer >= 1"),
    (dict(sampler="dpm"), "unknown sampler 'dpm'; choose one of euler, midpoint, heun, rk4"),
    (dict(num_images_per_prompt=0), "num_images_per_prompt must be >= 1"),
    (dict(cfg_scale=-1), "cfg scale must be >= 0"),
    (dict(cfg_scale=3, cfg_interval=(0.8, 0.2)), "cfg interval must satisfy 0 <= LO <= HI <= 1"),
    (dict(cfg_scale=3, cfg_interval=(0.5,)), "cfg interval must be two times"),
    (dict(cfg_scale=2, negative_prompt=["a", "b", "c"]), "3 negative prompts for 1 prompts"),
])
def test_bad_input_one_line_errors(encoder, kwargs, match):
    pipe = _pipe(encoder)
    with pytest.raises(RectiflowError, match=match) as e:
        pipe(PROMPTS[0], progress=False, **kwargs)
    assert "\n" not in str(e.value)


def test_bad_prompts_and_mismatched_components(encoder):
    pipe = _pipe(encoder)
    with pytest.raises(RectiflowError, match="non-empty"):
        pipe([], progress=False)
    params = dataclasses.replace(TRANSFORMER_PRESETS["micro"], context_in_dim=128)
    with pytest.raises(RectiflowError, match="text encoder gives features"):
        Pipeline(build_transformer(params), pipe.autoencoder, encoder)
    assert DEFAULT is not None


def test_prompt_embeds_replace_the_encoder_and_mix_sequence_and_pooled(encoder):
    pipe = _pipe(encoder)
    ref = pipe(PROMPTS, seed=2, cfg_scale=2.0, progress=False)
    txt, vec = pipe.encode_prompts(PROMPTS)
    given = pipe(["x", "y"], seed=2, cfg_scale=2.0, prompt_embeds=(txt, vec), progress=False)
    assert torch.equal(given.latents, ref.latents)
    assert [s["prompt"] for s in given.settings] == ["x", "y"]  # prompts only label the images
    # the token sequence of prompt 0 with the pooled vector of prompt 1: differs from both originals
    mixed = pipe(PROMPTS[:1], seed=2, prompt_embeds=(txt[:1], vec[1:]), progress=False)
    plain = pipe(PROMPTS, seed=2, progress=False)
    assert not torch.allclose(mixed.latents[0], plain.latents[0])
    with pytest.raises(RectiflowError, match=r"prompt_embeds txt has shape \(1, 16, 384\); expected \[2, L"):
        pipe(PROMPTS, prompt_embeds=(txt[:1], vec[:1]), progress=False)
    with pytest.raises(RectiflowError, match="prompt_embeds vec has shape"):
        pipe(PROMPTS, prompt_embeds=(txt, vec[:, :10]), progress=False)
    with pytest.raises(RectiflowError, match="a pair of tensors"):
        pipe(PROMPTS, prompt_embeds=txt, progress=False)
