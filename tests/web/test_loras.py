"""LoRAs in `rectiflow serve`: loaded once by server-side id, switched on per request with its scale, off for
the next job; the PNG settings record them; requests name ids, never files."""

import io

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from rectiflow.convert.lora import save_lora
from rectiflow.errors import FormatError
from rectiflow.nn.lora import add_lora, lora_modules, remove_lora
from rectiflow.sample import Pipeline
from rectiflow.web.loras import load_server_loras

PROMPT = "a photo of a red circle"


@pytest.fixture(scope="module")
def lora_file(tiny_bundle, tmp_path_factory):
    pipe = Pipeline.from_bundle(tiny_bundle, device="cpu", dtype=torch.float32)
    add_lora(pipe.transformer, "x", rank=4, targets="attn")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, adapter in lora_modules(pipe.transformer, "x"):
            adapter.up.weight.copy_(torch.randn(adapter.up.weight.shape, generator=g) * 2.0)
    path = save_lora(pipe.transformer, tmp_path_factory.mktemp("lora") / "heart.safetensors")
    remove_lora(pipe.transformer)
    return path


@pytest.fixture
def lora_app(make_app, tiny_bundle, lora_file):
    pipe = Pipeline.from_bundle(tiny_bundle, device="cpu", dtype=torch.float32)  # its own: LoRAs change it
    assert load_server_loras({"tiny": pipe}, [f"heart={lora_file}"]) == {"tiny": ["heart"]}
    return make_app(pipelines={"tiny": pipe})[0]


def _pixels(client, job_id):
    job = client.get(f"/v1/jobs/{job_id}", params={"wait": 30}).json()
    assert job["status"] == "done", job
    with Image.open(io.BytesIO(client.get(job["images"][0]).content)) as im:
        return job, np.asarray(im).astype(int)


def test_a_lora_is_on_for_its_job_only(lora_app, tiny_pipe, tiny_bundle, lora_file):
    with TestClient(lora_app) as client:
        assert client.get("/v1/models").json()["models"][0]["loras"] == ["heart"]
        post = lambda body: client.post("/v1/generate", json=dict(prompt=PROMPT, seed=1, **body)).json()["id"]  # noqa: E731
        plain_job, plain = _pixels(client, post({}))
        lora_job, styled = _pixels(client, post({"loras": [{"id": "heart", "scale": 0.7}]}))
        again_job, again = _pixels(client, post({}))
    assert "loras" not in plain_job["settings"][0]
    assert lora_job["settings"][0]["loras"] == [{"name": "heart", "scale": 0.7}]
    assert np.array_equal(plain, again) and "loras" not in again_job["settings"][0]  # switched off again
    assert np.abs(plain - styled).max() > 3
    base = np.asarray(tiny_pipe([PROMPT], seed=1, progress=False).images[0]).astype(int)
    assert np.array_equal(plain, base)
    ref = Pipeline.from_bundle(tiny_bundle, loras=[(str(lora_file), 0.7)], merge_loras=False)
    assert np.abs(styled - np.asarray(ref([PROMPT], seed=1, progress=False).images[0]).astype(int)).max() <= 1


@pytest.mark.parametrize("loras, field", [
    ([{"id": "nope"}], "loras.0.id"),
    ([{"id": "../heart.safetensors"}], "loras.0.id"),
    ([{"id": "heart", "scale": 100}], "loras.0.scale"),
    ([{"id": "heart", "path": "/x"}], "loras.0.path"),
    ([{"id": "heart"}, {"id": "heart"}], "loras"),
    ([{"id": "heart"}] * 5, "loras"),
])
def test_lora_validation_names_the_field(lora_app, loras, field):
    r = TestClient(lora_app).post("/v1/generate", json={"prompt": PROMPT, "loras": loras})
    assert r.status_code == 422, r.text
    assert ".".join(str(p) for p in r.json()["detail"][0]["loc"][1:]) == field


def test_a_lora_that_fits_no_model_is_refused(lora_file):
    from rectiflow.sample import random_bundle

    other = Pipeline.from_bundle(random_bundle(lora_file.parent / "other", transformer="tiny"))
    with pytest.raises(FormatError, match="fits none of the served models"):
        load_server_loras({"other": other}, [f"heart={lora_file}"])
