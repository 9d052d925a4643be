"""`rectiflow compare`: the grid's files, the PNGs equal to `generate`'s, the scorer's verdicts, resuming."""

import json

import pytest
import torch

from rectiflow.cli.main import main
from rectiflow.convert.bundle import SamplingDefaults
from rectiflow.eval.compare import compare
from rectiflow.sample import Pipeline, random_bundle, read_png_settings, save_png

SHAPES_PROMPT = "a photo of a red circle"
OTHER_PROMPT = "a fox in the snow <script>"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return random_bundle(tmp_path_factory.mktemp("compare") / "tiny",
                         defaults=SamplingDefaults(steps=2, width=32, height=32))


@pytest.fixture(scope="module")
def pipe(bundle):
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # many tiny calls: one thread is fastest on a shared machine
    yield Pipeline.from_bundle(bundle, device="cpu", dtype=torch.float32)
    torch.set_num_threads(before)


def test_grid_files_settings_and_verdicts(pipe, tmp_path):
    out = tmp_path / "out"
    report = compare({"a": pipe, "b": pipe}, [SHAPES_PROMPT, OTHER_PROMPT], out, steps=[1, 2], seeds=[0, 1],
                     settings_extra={"rectiflow_version": "x"})
    assert report["generated"] == 16 and report["reused"] == 0 and len(report["images"]) == 16
    assert sorted(p.name for p in out.glob("sheet-*.png")) == ["sheet-000.png", "sheet-001.png"]
    saved = json.loads((out / "compare.json").read_text())
    assert saved["images"] == report["images"] and saved["models"]["a"]["model_hash"] == pipe.model_hash
    for r in report["images"]:
        _, settings = read_png_settings(out / r["file"])
        assert settings == r["settings"]
        assert [settings[k] for k in ("prompt", "steps", "seed")] == [r["prompt"], r["steps"], r["seed"]]
        assert (r["verdict"] is None) == (r["prompt"] == OTHER_PROMPT)
    shapes = [r for r in report["images"] if r["verdict"] is not None]
    assert all(set(r["verdict"]) == {"correct", "failure"} for r in shapes)
    assert set(report["accuracy"]) == {"a @ 1 steps", "a @ 2 steps", "b @ 1 steps", "b @ 2 steps"}
    page = (out / "index.html").read_text()
    assert "sheet-001.png" in page and "&lt;script&gt;" in page and "<script>" not in page


def test_images_equal_the_generate_command(pipe, tmp_path):
    out = tmp_path / "out"
    report = compare({"a": pipe}, [SHAPES_PROMPT], out, steps=[2], seeds=[3, 4],
                     settings_extra={"rectiflow_version": "x"})
    # `rectiflow generate PROMPT --steps 2 --seed 3 -n 2`
    result = pipe([SHAPES_PROMPT], steps=2, seed=3, num_images_per_prompt=2, progress=False)
    for r, image, settings in zip(report["images"], result.images, result.settings):
        path = save_png(image, tmp_path / f"{r['seed']}.png", dict(settings, rectiflow_version="x"))
        assert (out / r["file"]).read_bytes() == path.read_bytes()


def test_a_rerun_resumes_and_regenerates_only_what_is_missing_or_changed(pipe, tmp_path):
    out = tmp_path / "out"
    first = compare({"a": pipe}, [SHAPES_PROMPT], out, steps=[1, 2], seeds=[0, 1])
    files = {r["file"]: (out / r["file"]).read_bytes() for r in first["images"]}
    again = compare({"a": pipe}, [SHAPES_PROMPT], out, steps=[1, 2], seeds=[0, 1])
    assert (again["generated"], again["reused"]) == (0, 4)
    (out / first["images"][0]["file"]).unlink()
    (out / first["images"][-1]["file"]).write_bytes(b"half a png")  # a crash without atomic writes
    third = compare({"a": pipe}, [SHAPES_PROMPT], out, steps=[1, 2], seeds=[0, 1])
    assert (third["generated"], third["reused"]) == (4, 0)  # both (steps) groups of two seeds
    assert {f: (out / f).read_bytes() for f in files} == files
    changed = compare({"a": pipe}, [SHAPES_PROMPT], out, steps=[1, 2], seeds=[0, 1],
                      options={"cfg_scale": 2.0})
    assert changed["generated"] == 4  # other settings: nothing reused


def test_cli_writes_the_grid_and_reports(bundle, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"# a comment\n{SHAPES_PROMPT}\n\n")
    out = tmp_path / "grid"
    assert main(["compare", str(prompts), "--model", f"tiny={bundle}", "--steps", "1,2", "-o", str(out),
                 "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    assert "1 sheet(s), 2 image(s) generated" in text and "tiny @ 2 steps" in text
    assert (out / "sheet-000.png").is_file() and (out / "index.html").is_file()


@pytest.mark.parametrize("content, args, message", [
    ("# only a comment\n", [], "holds no prompts"),
    (None, [], "cannot read prompts"),
    ("a\n", ["--steps", "0"], "--steps must all be >= 1"),
    ("a\n", ["--seeds", "-1"], "--seeds must all be >= 0"),
    ("a\n", ["--model", "x/y=somewhere"], "model id 'x/y' is not allowed"),
])
def test_cli_errors_are_one_line(tmp_path, capsys, content, args, message):
    prompts = tmp_path / "prompts.txt"
    if content is not None:
        prompts.write_text(content)
    assert main(["compare", str(prompts), "-o", str(tmp_path / "o"), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_cli_lora_adds_a_row_per_model(bundle, pipe, tmp_path, capsys):
    from rectiflow.convert.lora import save_lora
    from rectiflow.nn.lora import add_lora, lora_modules, remove_lora

    add_lora(pipe.transformer, "x", rank=4, targets="attn")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, adapter in lora_modules(pipe.transformer, "x"):
            adapter.up.weight.copy_(torch.randn(adapter.up.weight.shape, generator=g) * 2.0)
    lora = save_lora(pipe.transformer, tmp_path / "heart.safetensors")
    remove_lora(pipe.transformer)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"{SHAPES_PROMPT}\n")
    out = tmp_path / "grid"
    assert main(["compare", str(prompts), "--model", f"tiny={bundle}", "--lora", f"heart={lora}:0.5",
                 "--steps", "2", "-o", str(out), "--device", "cpu"]) == 0
    report = json.loads((out / "compare.json").read_text())
    assert list(report["models"]) == ["tiny", "tiny+heart"]
    plain, styled = (r["settings"] for r in report["images"])
    assert "loras" not in plain and styled["loras"] == [{"name": "heart", "scale": 0.5}]
    files = [(out / r["file"]).read_bytes() for r in report["images"]]
    assert files[0] != files[1]
