"""Models trained on each flow path sample correctly: train a few steps, export a bundle, `generate` from it,
compare with a hand-written Euler loop that converts the network output with rectiflow.flow; bundles that
do not say how (no path, an unknown one) are refused with one line."""

import json

import pytest
import torch

from conftest import TINY_TOML, overrides, random_bundle_cache
from rectiflow.cli.main import main
from rectiflow.convert.autoencoder import load_autoencoder
from rectiflow.convert.bundle import load_bundle
from rectiflow.convert.transformer import load_transformer
from rectiflow.errors import RectiflowError
from rectiflow.flow import PATHS, get_path
from rectiflow.models.text import load_text_encoder
from rectiflow.models.transformer import image_ids, pack, text_ids, unpack
from rectiflow.sample import Pipeline

pytestmark = pytest.mark.slow  # four tiny trainings and exports: ~20 s of CPU

PROMPTS = ["a red square", "a blue square in the top left on white"]
STEPS, SIZE = 3, 32


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """The tiny random autoencoder (from a random bundle) and a 16-sample cache made with it and MiniLM."""
    root = tmp_path_factory.mktemp("flow-paths")
    ae_file, cache = random_bundle_cache(root, 16)
    return root, ae_file, cache


def _train_and_export(parts, path_name: str):
    from rectiflow.train.config import load_config
    from rectiflow.train.trainer import Trainer

    root, ae_file, cache = parts
    out = root / path_name
    if not (out / "export" / "bundle" / "model.json").is_file():
        cfg = load_config(TINY_TOML, overrides(cache, out, "model.preset=micro", "train.steps=3",
                                               f'flow.path="{path_name}"', f'model.autoencoder="{ae_file}"',
                                               "export.bundle=true", "checkpoint.every=0"))
        Trainer(cfg).fit()
    return out / "export" / "bundle"


def _hand_loop(bundle, path, convert: bool) -> torch.Tensor:
    """Per-image seeded noise, pack, linear grid t: 1 -> 0, Euler x += (t_next - t) v with
    v = path.to_velocity(model(path.model_input(x, t)), x, t) (convert) or v = the raw output (not)."""
    model = load_transformer(bundle / "transformer.safetensors").eval()
    z = load_autoencoder(bundle / "ae.safetensors").params.z_channels
    enc = load_text_encoder("minilm", device="cpu", dtype=torch.float32)
    lh = lw = SIZE // 8
    with torch.inference_mode():
        txt, vec = enc.encode(PROMPTS)
        b = len(PROMPTS)
        x = pack(torch.stack([torch.randn(z, lh, lw, generator=torch.Generator().manual_seed(i))
                              for i in range(b)]))  # [b, L, 4z]
        ts = torch.linspace(1, 0, STEPS + 1, dtype=torch.float64).tolist()
        for t, t_next in zip(ts[:-1], ts[1:]):
            tt = torch.full((b,), t, dtype=torch.float32)
            net_in = path.model_input(x, tt) if convert else x
            out = model(img=net_in, img_ids=image_ids(b, lh, lw), txt=txt, txt_ids=text_ids(b, txt.shape[1]),
                        timesteps=tt, y=vec, guidance=None)
            v = path.to_velocity(out, x, tt) if convert else out
            x = x + (t_next - t) * v
    return unpack(x, lh, lw)  # [b, z, lh, lw]


@pytest.mark.parametrize("path_name", sorted(PATHS))
def test_generate_samples_the_trained_path(parts, path_name):
    bundle = _train_and_export(parts, path_name)
    card = json.loads((bundle / "model.json").read_text())
    assert card["flow"]["path"] == path_name and card["flow"]["timestep_input"] == "t"
    path = get_path(path_name)
    pipe = Pipeline.from_bundle(bundle)
    assert pipe.flow_path == path
    result = pipe.generate(PROMPTS, steps=STEPS, width=SIZE, height=SIZE, seed=0, sampler="euler", shift=None,
                           cfg_scale=1.0, progress=False)
    expected = _hand_loop(bundle, path, convert=True)
    torch.testing.assert_close(result.latents, expected, rtol=1e-4, atol=1e-5)
    if path_name != "rectified_flow":  # the old behaviour (output taken as the velocity) is far from it
        wrong = _hand_loop(bundle, path, convert=False)
        assert (result.latents - wrong).abs().max() > 1e-2


def _rewrite_card(bundle, tmp_path, edit):
    import shutil

    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    card = json.loads((copy / "model.json").read_text())
    edit(card)
    (copy / "model.json").write_text(json.dumps(card))
    return copy


@pytest.mark.parametrize("edit, message", [
    (lambda c: c.pop("flow"), "records no flow path but its transformer was trained with flow.path = "
                              "'eps_linear'"),
    (lambda c: c["flow"].pop("path"), "names no flow path"),
    (lambda c: c["flow"].update(path="ddpm"), "unknown flow path 'ddpm'"),
    (lambda c: c["flow"].update(prediction="velocity"), "has prediction 'eps', the record says 'velocity'"),
])
def test_bundle_without_a_usable_path_is_refused(parts, tmp_path, capsys, edit, message):
    copy = _rewrite_card(_train_and_export(parts, "eps_linear"), tmp_path, edit)
    with pytest.raises(RectiflowError, match=message):
        load_bundle(copy)
    assert main(["generate", "a red square", "--model", str(copy), "-o", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err


def test_card_without_flow_from_rectified_flow_weights_is_rectified_flow(parts, tmp_path):
    """Bundles written before paths were recorded (the bundled default model) keep sampling as before."""
    copy = _rewrite_card(_train_and_export(parts, "rectified_flow"), tmp_path, lambda c: c.pop("flow"))
    assert load_bundle(copy).flow_path == get_path("rectified_flow")
