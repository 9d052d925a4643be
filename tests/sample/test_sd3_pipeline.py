"""A whole tiny random StableDiffusion3Pipeline (diffusers) against rectiflow's Pipeline loading the same
saved folder: same noise, same grid, CFG, skip-layer guidance; the SD3 defaults; bad sizes."""

import pytest
import torch

from rectiflow.convert.bundle import load_bundle
from rectiflow.errors import RectiflowError
from rectiflow.flow import linear_grid
from rectiflow.sample import Pipeline, initial_noise
from rectiflow.sample.slg import SkipLayerGuidance
from sd3_fixtures import save_sd3_text

diffusers = pytest.importorskip("diffusers")

T5_LEN = 12


@pytest.fixture(scope="module")
def sd3_folder(tmp_path_factory):
    """A StableDiffusion3Pipeline saved by diffusers: SD3.5-Medium-like transformer (QK-norm, dual attention
    in block 0, 3 blocks), a 16-channel 8x autoencoder with SD3's latent normalisation, CLIP-L/G + T5."""
    from transformers import AutoTokenizer, CLIPTextModelWithProjection, T5EncoderModel

    root = tmp_path_factory.mktemp("sd3") / "stable-diffusion-3.5-medium-tiny"
    spec = save_sd3_text(root, max_length=T5_LEN)
    torch.manual_seed(0)
    transformer = diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=16, num_layers=3, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=64, caption_projection_dim=32, pooled_projection_dim=56,
        out_channels=16, pos_embed_max_size=16, dual_attention_layers=(0,), qk_norm="rms_norm")
    with torch.no_grad():
        for t in transformer.parameters():
            t.normal_(0.0, 0.3 if t.ndim == 1 else 1.0 / t[0].numel() ** 0.5)
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 16, 16), layers_per_block=1,
        latent_channels=16, norm_num_groups=4, use_quant_conv=False, use_post_quant_conv=False,
        scaling_factor=1.5305, shift_factor=0.0609, sample_size=64)
    pipe = diffusers.StableDiffusion3Pipeline(
        transformer=transformer, scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=CLIPTextModelWithProjection.from_pretrained(spec["clip_l_path"]),
        tokenizer=AutoTokenizer.from_pretrained(spec["clip_l_tokenizer_path"]),
        text_encoder_2=CLIPTextModelWithProjection.from_pretrained(spec["clip_g_path"]),
        tokenizer_2=AutoTokenizer.from_pretrained(spec["clip_g_tokenizer_path"]),
        text_encoder_3=T5EncoderModel.from_pretrained(spec["t5_path"]),
        tokenizer_3=AutoTokenizer.from_pretrained(spec["t5_tokenizer_path"]))
    pipe.save_pretrained(root)
    return root


def _ours(root):
    pipe = Pipeline.from_bundle(root)
    pipe.text_encoder.max_length = T5_LEN  # diffusers' max_sequence_length below (its default is 256)
    return pipe


@pytest.mark.parametrize("slg", [None, SkipLayerGuidance(layers=(1,), scale=2.0, start=0.0, stop=0.5)],
                         ids=["cfg", "cfg+slg"])
def test_equals_diffusers_pipeline(sd3_folder, slg):
    ref = diffusers.StableDiffusion3Pipeline.from_pretrained(sd3_folder)
    ours = _ours(sd3_folder)
    prompts, steps, size, cfg = ["a photo of a red circle", "two blue square"], 4, 64, 4.5
    noise = initial_noise([0, 1], 2, 16, size // 8, size // 8, None)
    result = ours(prompts, steps=steps, width=size, height=size, seed=0, cfg_scale=cfg,
                  negative_prompt="blue", skip_layer_guidance=slg, progress=False)
    # diffusers shifts the sigmas it is given: the unshifted linear grid gives our shifted one
    sigmas = linear_grid(steps)[:-1].tolist()
    extra = {} if slg is None else dict(
        skip_guidance_layers=list(slg.layers), skip_layer_guidance_scale=slg.scale,
        skip_layer_guidance_start=slg.start, skip_layer_guidance_stop=slg.stop)
    with torch.no_grad():
        expect = ref(prompts, negative_prompt="blue", num_inference_steps=steps, sigmas=sigmas, height=size,
                     width=size, guidance_scale=cfg, latents=noise.clone(), max_sequence_length=T5_LEN,
                     output_type="latent", **extra).images
    assert result.latents.shape == expect.shape == (2, 16, 8, 8)
    err = ((result.latents - expect).norm() / expect.norm()).item()
    assert err <= 1e-4, err
    if slg is not None:  # the option changes the result
        plain = ours(prompts, steps=steps, width=size, height=size, seed=0, cfg_scale=cfg,
                     negative_prompt="blue", progress=False)
        assert ((plain.latents - expect).norm() / expect.norm()).item() > 1e-3


def test_sd3_defaults_and_layout(sd3_folder):
    b = load_bundle(sd3_folder)
    d = b.defaults
    # an SD3.5-Medium-like transformer (dual attention): 40 steps, CFG 4.5, shift 3 from scheduler_config.json
    assert (b.layout, d.steps, d.cfg_scale, d.shift, d.width) == ("diffusers", 40, 4.5, 3.0, 1024)
    assert b.autoencoder.params.scale_factor == 1.5305 and b.autoencoder.params.shift_factor == 0.0609


def test_bad_sizes_and_slg_on_flux(sd3_folder):
    ours = _ours(sd3_folder)
    with pytest.raises(RectiflowError, match="width 72 is not a positive multiple of 16"):
        ours("a circle", width=72, height=64, steps=1, progress=False)
    from rectiflow.errors import ConfigError

    with pytest.raises(ConfigError, match="start 0.5 / stop 0.2"):
        SkipLayerGuidance(start=0.5, stop=0.2)
