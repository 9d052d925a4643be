"""A FLUX transformer with 1 x 1 patches (`model.params.patch_size = 1`: a token per latent pixel, 4x the
tokens of FLUX's 2 x 2) trains, exports and samples end to end through the model-family seam; `generate`
equals a hand-written Euler loop over per-pixel tokens; BFL and diffusers files, which cannot record the
patch size, are refused with one line."""

import pytest
import torch

from conftest import TINY_TOML, overrides, random_bundle_cache
from rectiflow.convert.transformer import load_transformer, save_transformer
from rectiflow.errors import FormatError
from rectiflow.models.text import load_text_encoder
from rectiflow.models.transformer import image_ids, pack, text_ids, unpack
from rectiflow.sample import Pipeline

PROMPTS = ["a red square", "a blue square in the top left on white"]
STEPS, SIZE = 3, 32
PATCH1 = ("model.params={depth = 1, depth_single_blocks = 1, patch_size = 1, in_channels = 16, "
          "out_channels = 16}")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    from rectiflow.train.config import load_config
    from rectiflow.train.trainer import Trainer

    root = tmp_path_factory.mktemp("patch1")
    ae_file, cache = random_bundle_cache(root, 8)
    cfg = load_config(TINY_TOML, overrides(cache, root / "run", "model.preset=micro", PATCH1, "train.steps=3",
                                           f'model.autoencoder="{ae_file}"', "export.bundle=true",
                                           "checkpoint.every=0"))
    Trainer(cfg).fit()
    return root / "run" / "export" / "bundle"


def test_patch_one_trains_exports_and_samples(bundle):
    model = load_transformer(bundle / "transformer.safetensors").eval()
    assert model.params.patch_size == 1 and model.img_in.in_features == 16
    pipe = Pipeline.from_bundle(bundle)
    assert pipe.image_tokens(SIZE // 8, SIZE // 8) == 16
    result = pipe.generate(PROMPTS, steps=STEPS, width=SIZE, height=SIZE, seed=0, sampler="euler", shift=None,
                           cfg_scale=1.0, progress=False)
    enc = load_text_encoder("minilm", device="cpu", dtype=torch.float32)
    lh = lw = SIZE // 8
    with torch.inference_mode():
        txt, vec = enc.encode(PROMPTS)
        x = pack(torch.stack([torch.randn(16, lh, lw, generator=torch.Generator().manual_seed(i))
                              for i in range(2)]), 1)  # [2, 16 tokens, 16]
        ts = torch.linspace(1, 0, STEPS + 1, dtype=torch.float64).tolist()
        for t, t_next in zip(ts[:-1], ts[1:]):
            tt = torch.full((2,), t, dtype=torch.float32)
            ids = image_ids(2, lh, lw, patch=1)
            v = model(img=x, img_ids=ids, txt=txt, txt_ids=text_ids(2, txt.shape[1]), timesteps=tt, y=vec,
                      guidance=None)
            x = x + (t_next - t) * v
    torch.testing.assert_close(result.latents, unpack(x, lh, lw, 1), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("fmt", ["bfl", "diffusers"])
def test_formats_that_cannot_record_the_patch_size_refuse_it(bundle, tmp_path, fmt):
    model = load_transformer(bundle / "transformer.safetensors")
    with pytest.raises(FormatError, match="patch_size=1 is a rectiflow-only ablation .* save with format="):
        save_transformer(model, tmp_path / "out", format=fmt)
    assert not any(tmp_path.iterdir())
