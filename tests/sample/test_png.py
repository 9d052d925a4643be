"""PNG metadata: the A1111 `parameters` chunk and the `rectiflow` JSON chunk."""

from PIL import Image

from rectiflow.sample.png import a1111_parameters, read_png_settings, save_png

SETTINGS = dict(prompt="a red circle", negative_prompt="blurry", steps=4, sampler="euler", cfg_scale=3.0,
                seed=7, width=64, height=48, model="tiny", model_hash="0123456789ab", guidance=None,
                shift="flux", dtype="float32", int8=False)


def test_a1111_text_layout():
    text = a1111_parameters(SETTINGS)
    assert text.splitlines() == [
        "a red circle",
        "Negative prompt: blurry",
        "Steps: 4, Sampler: euler, CFG scale: 3.0, Seed: 7, Size: 64x48, Model hash: 0123456789ab, "
        "Model: tiny, Shift: flux, Dtype: float32",
    ]
    no_neg = a1111_parameters(dict(SETTINGS, negative_prompt=None, model="a, b", int8=True))
    assert "Negative prompt" not in no_neg
    assert 'Model: "a, b"' in no_neg and "Int8: True" in no_neg  # separators quoted as A1111 does


def test_png_round_trip_and_bytes_deterministic(tmp_path):
    img = Image.new("RGB", (64, 48), (10, 20, 30))
    a, b = save_png(img, tmp_path / "a.png", SETTINGS), save_png(img, tmp_path / "b.png", SETTINGS)
    assert a.read_bytes() == b.read_bytes()
    text, js = read_png_settings(a)
    assert text == a1111_parameters(SETTINGS)
    assert js == SETTINGS
    unicode = dict(SETTINGS, prompt="ein gr\u00fcner Stern \u2605")
    save_png(img, tmp_path / "u.png", unicode)
    assert read_png_settings(tmp_path / "u.png")[1]["prompt"] == unicode["prompt"]
    Image.new("RGB", (4, 4)).save(tmp_path / "plain.png")
    assert read_png_settings(tmp_path / "plain.png") == (None, None)
