"""The HTTP API through FastAPI's TestClient: every endpoint, every validation error, the queue and store
bounds, and PNGs that carry the same metadata (byte for byte) as `rectiflow generate` writes."""

import io
import json

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from rectiflow import __version__
from rectiflow.sample import read_png_settings, save_png

PROMPT = "a photo of a red circle"


def _done(client, job_id, wait=30):
    job = client.get(f"/v1/jobs/{job_id}", params={"wait": wait}).json()
    assert job["status"] == "done", job
    return job


def test_generate_job_and_png_equal_the_generate_command(make_app, tiny_pipe, tmp_path):
    app, _ = make_app()
    with TestClient(app) as client:
        r = client.post("/v1/generate", json={"prompt": PROMPT, "n": 2, "seed": 7})
        assert r.status_code == 202
        job_id = r.json()["id"]
        assert r.headers["location"] == f"/v1/jobs/{job_id}" == r.json()["url"]
        job = _done(client, job_id)
        assert job["progress"] == 1.0 and job["error"] is None and len(job["images"]) == 2
        assert [s["seed"] for s in job["settings"]] == [7, 8]
        # what `rectiflow generate PROMPT -n 2 --seed 7` does (cli/generate.py run)
        result = tiny_pipe([PROMPT], seed=7, num_images_per_prompt=2, progress=False)
        for url, image, settings, i in zip(job["images"], result.images, result.settings, range(2)):
            served = client.get(url)
            assert served.status_code == 200 and served.headers["content-type"] == "image/png"
            path = save_png(image, tmp_path / f"{i}.png", dict(settings, rectiflow_version=__version__))
            assert served.content == path.read_bytes()
            a1111, meta = read_png_settings(io.BytesIO(served.content))
            assert meta == read_png_settings(path)[1] and meta["seed"] == 7 + i
            assert meta["steps"] == tiny_pipe.defaults.steps
            assert a1111.startswith(PROMPT + "\n") and f"Seed: {7 + i}" in a1111
            assert meta == job["settings"][i]


def test_unset_fields_take_the_models_defaults_and_a_random_seed(make_app, tiny_pipe):
    d = tiny_pipe.defaults
    app, _ = make_app()
    with TestClient(app) as client:
        job = _done(client, client.post("/v1/generate", json={"prompt": PROMPT}).json()["id"])
        (settings,) = job["settings"]
        assert (settings["width"], settings["height"], settings["steps"]) == (d.width, d.height, d.steps)
        assert settings["sampler"] == "euler" and settings["cfg_scale"] == 1.0
        assert 0 <= settings["seed"] < 2**32 and job["seed"] == settings["seed"]


def test_options_reach_the_pipeline(make_app):
    app, _ = make_app()
    body = {"prompt": PROMPT, "negative_prompt": "blue", "seed": 3, "steps": 3, "sampler": "heun",
            "shift": 3.0, "cfg": 2.5, "width": 48, "height": 16, "model": "tiny"}
    with TestClient(app) as client:
        job = _done(client, client.post("/v1/generate", json=body).json()["id"])
        s = job["settings"][0]
        assert (s["steps"], s["sampler"], s["shift"], s["cfg_scale"]) == (3, "heun", 3.0, 2.5)
        assert (s["width"], s["height"], s["negative_prompt"], s["model"]) == (48, 16, "blue", "random-micro")
        with Image.open(io.BytesIO(client.get(job["images"][0]).content)) as im:
            assert im.size == (48, 16)
        r = client.post("/v1/generate", json={"prompt": PROMPT, "shift": "none"})
        job = _done(client, r.json()["id"])
        assert job["settings"][0]["shift"] is None
        r = client.post("/v1/generate", json={"prompt": PROMPT, "cfg": 3.0, "cfg_interval": [0.5, 1]})
        assert _done(client, r.json()["id"])["settings"][0]["cfg_interval"] == [0.5, 1.0]


def test_models_status_page_and_openapi(make_app, tiny_pipe):
    app, _ = make_app(queue_size=5)
    with TestClient(app) as client:
        (model,) = client.get("/v1/models").json()["models"]
        assert model == {"id": "tiny", "name": tiny_pipe.name, "model_hash": tiny_pipe.model_hash,
                         "defaults": tiny_pipe.defaults.to_dict(), "loras": []}
        status = client.get("/v1/status").json()
        assert status["queue_size"] == 5 and status["limits"]["max_n"] == 8
        assert status["version"] == __version__
        page = client.get("/")
        assert page.status_code == 200 and "text/html" in page.headers["content-type"]
        assert client.get("/static/app.js").status_code == 200
        assert client.get("/static/../jobs.py").status_code == 404
        schema = client.get("/openapi.json").json()
        body = schema["components"]["schemas"]["GenerateRequest"]
        assert body["additionalProperties"] is False and body["required"] == ["prompt"]
        assert {"/v1/generate", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/events", "/v1/models"} <= set(
            schema["paths"])


def test_events_stream_progress_until_done(make_app):
    app, _ = make_app()
    with TestClient(app) as client:
        job_id = client.post("/v1/generate", json={"prompt": PROMPT, "steps": 50}).json()["id"]
        events = []
        with client.stream("GET", f"/v1/jobs/{job_id}/events") as stream:
            assert stream.headers["content-type"].startswith("text/event-stream")
            for line in stream.iter_lines():
                if line.startswith("data: "):
                    events.append(json.loads(line[6:]))
        assert events[-1]["status"] == "done" and len(events[-1]["images"]) == 1
        progress = [e["progress"] for e in events]
        # monotone, with states between start and end (the stream sends the newest state when it wakes,
        # so it may skip some of the 50 steps, never reorder them)
        assert progress == sorted(progress) and len({p for p in progress if 0 < p < 1}) >= 1
        assert all(round(p * 50, 6) == int(round(p * 50)) for p in progress if p < 0.99)


def test_unknown_job_and_image_are_404(make_app):
    app, _ = make_app()
    with TestClient(app) as client:
        for path in ("/v1/jobs/nope", "/v1/jobs/nope/events", "/v1/images/0123abcd.png",
                     "/v1/images/..%2F..%2Fetc%2Fpasswd.png"):
            r = client.get(path)
            assert r.status_code == 404, path
        assert client.delete("/v1/jobs/nope").status_code == 404


# ------------------------------------------------------------------------------------ validation

def _field(response) -> str:
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    return ".".join(str(p) for p in detail[0]["loc"][1:])


@pytest.mark.parametrize("body, field", [
    ({}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": 5}, "prompt"),
    ({"prompt": "x" * 2001}, "prompt"),
    ({"prompt": "x" * 2**20}, "prompt"),  # a 1 MB prompt
    ({"prompt": "a", "negative_prompt": "x" * 2001}, "negative_prompt"),
    ({"prompt": "a", "seed": -1}, "seed"),
    ({"prompt": "a", "seed": 2**53}, "seed"),
    ({"prompt": "a", "seed": "x"}, "seed"),
    ({"prompt": "a", "steps": 0}, "steps"),
    ({"prompt": "a", "steps": 10**9}, "steps"),
    ({"prompt": "a", "steps": 2.5}, "steps"),
    ({"prompt": "a", "sampler": "ddim"}, "sampler"),
    ({"prompt": "a", "shift": -1}, "shift"),
    ({"prompt": "a", "shift": "sd3"}, "shift"),
    ({"prompt": "a", "cfg": -0.5}, "cfg"),
    ({"prompt": "a", "guidance": 1e9}, "guidance"),
    ({"prompt": "a", "cfg_interval": [0.8, 0.2]}, "cfg_interval"),
    ({"prompt": "a", "cfg_interval": [0.5, 2]}, "cfg_interval.1"),
    ({"prompt": "a", "cfg_interval": [0.5]}, "cfg_interval.1"),  # the missing HI
    ({"prompt": "a", "width": 17}, "width"),
    ({"prompt": "a", "width": 10**6}, "width"),
    ({"prompt": "a", "height": 0}, "height"),
    ({"prompt": "a", "n": 0}, "n"),
    ({"prompt": "a", "n": 10**6}, "n"),
    ({"prompt": "a", "model": "../../etc/passwd"}, "model"),
    ({"prompt": "a", "model": "/abs/path"}, "model"),
    ({"prompt": "a", "model": "C:\\models\\x"}, "model"),
    ({"prompt": "a", "model": ".hidden"}, "model"),
    ({"prompt": "a", "model": "other"}, "model"),  # well-formed but not served
    ({"prompt": "a", "loras": [{"id": "x"}]}, "loras.0.id"),  # this server has no LoRAs
    ({"prompt": "a", "path": "/etc/passwd"}, "path"),
    ({"prompt": "a", "steps": 100, "n": 8, "width": 2048, "height": 2048}, "steps"),  # pixels x steps x n
])
def test_validation_errors_name_the_field_and_do_not_echo_input(make_app, body, field):
    app, manager = make_app()
    client = TestClient(app)  # no lifespan: nothing runs, nothing may be queued
    r = client.post("/v1/generate", json=body)
    assert _field(r) == field
    assert r.json()["error"].startswith(field)
    assert len(r.content) < 2000  # the submitted values are not echoed back
    assert manager.stats()["queued"] == 0


def test_seed_plus_n_must_stay_exact_in_javascript(make_app):
    app, _ = make_app()
    r = TestClient(app).post("/v1/generate", json={"prompt": "a", "seed": 2**53 - 1, "n": 2})
    assert r.status_code == 422 and "seed + n - 1" in r.json()["error"]


@pytest.mark.parametrize("content, needle", [
    (b"{bad json", "malformed JSON"),
    (b'["a list"]', "dictionary"),
    (b"", "Field required"),
    (b'{"prompt": "a"', "malformed JSON"),
])
def test_malformed_bodies_are_422(make_app, content, needle):
    app, _ = make_app()
    r = TestClient(app).post("/v1/generate", content=content, headers={"content-type": "application/json"})
    assert r.status_code == 422 and needle in r.json()["error"], r.text


def test_oversized_bodies_are_refused_before_parsing(make_app):
    app, _ = make_app()
    client = TestClient(app)
    big = json.dumps({"prompt": "x" * (3 * 2**20)}).encode()
    r = client.post("/v1/generate", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and "larger than" in r.json()["error"]

    def chunks():  # no Content-Length: counted as it arrives
        for _ in range(3):
            yield b" " * 2**20

    r = client.post("/v1/generate", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413


# ------------------------------------------------------------------------------------ bounds

def test_queue_bound_answers_429_with_retry_after(make_app):
    app, manager = make_app(queue_size=2)
    client = TestClient(app)  # workers not started: jobs stay queued
    ids = [client.post("/v1/generate", json={"prompt": PROMPT, "n": 3}).json()["id"] for _ in range(2)]
    full = client.post("/v1/generate", json={"prompt": PROMPT})
    assert full.status_code == 429 and int(full.headers["retry-after"]) >= 1
    assert "queue is full" in full.json()["error"]
    assert [client.get(f"/v1/jobs/{i}").json()["queue_position"] for i in ids] == [0, 1]
    cancelled = client.delete(f"/v1/jobs/{ids[0]}").json()
    assert cancelled["status"] == "cancelled" and cancelled["queue_position"] is None
    assert client.get(f"/v1/jobs/{ids[1]}").json()["queue_position"] == 0
    assert client.post("/v1/generate", json={"prompt": PROMPT}).status_code == 202
    assert manager.stats()["queued"] == 2


def test_image_store_drops_least_recently_used_images(make_app):
    app, manager = make_app()
    with TestClient(app) as client:
        size = len(client.get(_done(client, client.post(
            "/v1/generate", json={"prompt": PROMPT, "seed": 0}).json()["id"])["images"][0]).content)
    # room for about three images of this size
    app, manager = make_app(store_bytes=int(3.5 * size))
    with TestClient(app) as client:
        urls = []
        for seed in range(3):
            urls += _done(client, client.post("/v1/generate", json={"prompt": PROMPT, "seed": seed})
                          .json()["id"])["images"]
        assert client.get(urls[0]).status_code == 200  # now the most recently used
        urls += _done(client, client.post("/v1/generate", json={"prompt": PROMPT, "seed": 9})
                      .json()["id"])["images"]
        assert client.get(urls[1]).status_code == 404  # the least recently used one went
        assert all(client.get(u).status_code == 200 for u in (urls[0], urls[2], urls[3]))
        store = client.get("/v1/status").json()["store"]
        assert store["bytes"] <= store["max_bytes"] and store["evicted"] >= 1


def test_the_request_schema_knows_every_sampler():
    from rectiflow.flow import METHODS
    from rectiflow.web.schemas import SAMPLER_NAMES

    assert sorted(SAMPLER_NAMES) == sorted(METHODS)


def test_jobs_carry_the_shapes_world_verdict_of_shapes_prompts(make_app):
    from rectiflow.eval.compare import verdict

    app, _ = make_app(annotate=verdict)
    with TestClient(app) as client:
        job = _done(client, client.post("/v1/generate", json={"prompt": PROMPT, "n": 2}).json()["id"])
        assert len(job["verdicts"]) == 2
        for url, v in zip(job["images"], job["verdicts"]):
            with Image.open(io.BytesIO(client.get(url).content)) as im:
                assert v == verdict(PROMPT, im.convert("RGB"))
        other = _done(client, client.post("/v1/generate", json={"prompt": "a fox in the snow"}).json()["id"])
        assert other["verdicts"] == [None]
