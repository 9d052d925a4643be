"""The HTTP face of `rectiflow serve` (FastAPI): the JSON API, progress events and the page.

    POST   /v1/generate          body: rectiflow.web.schemas -> 202 {"id", "url"}; 429 + Retry-After when full
    GET    /v1/jobs/{id}         {"status", "progress", "images": [URL], "settings", "error", ...}
                                 ?wait=S: answer when the job has finished or after S seconds (long poll)
    DELETE /v1/jobs/{id}         cancel (queued: at once; running: at its next solver step)
    GET    /v1/jobs/{id}/events  server-sent events: the job's JSON on every change, until it finishes
    GET    /v1/images/{key}.png  the PNG, with the metadata chunks `rectiflow generate` writes
    GET    /v1/models            the server's model ids, names, hashes and sampling defaults
    GET    /v1/status            queue, workers, image store, limits
    GET    /                     the page (static/index.html); /static/* its script and style
    GET    /docs, /openapi.json  FastAPI's schema and its viewer

Errors are JSON: validation errors are 422 with {"detail": [{"loc": [...], "msg", "type"}], "error": "one
line naming the field"}; the submitted values are not echoed back (a 1 MB prompt stays on the client).
"""


import json
import secrets
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Query
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles

from rectiflow.flow import parse_time_shift
from rectiflow.nn.lora import lora_names
from rectiflow.web.jobs import FINISHED, Job, JobManager, QueueFull
from rectiflow.web.schemas import Limits, request_model

STATIC = Path(__file__).parent / "static"
KEEPALIVE_S = 15.0  # an SSE comment this often keeps proxies from closing an idle stream
MAX_WAIT_S = 30.0


def _error_line(errors: list[dict[str, Any]]) -> str:
    first = errors[0]
    if first.get("type") == "json_invalid":
        return f"body: malformed JSON ({first.get('msg', '')} at character {first['loc'][-1]})"
    where = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or "body"
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{where}: {first.get('msg', 'invalid')}{more}"


_TYPE_TAGS = ("float", "int", "str", "bool", "list", "dict", "none")


def _merge_union_errors(raw) -> list[dict[str, Any]]:
    """pydantic reports a union field once per member (loc [..., "shift", "float"]); give one error per
    field instead, its messages joined with "or", and no echo of the submitted value."""
    merged: dict[tuple, dict[str, Any]] = {}
    for e in raw:
        loc = []
        for part in e.get("loc", ()):
            if isinstance(part, str) and ("[" in part or part in _TYPE_TAGS):
                break
            loc.append(part)
        key = tuple(loc)
        if key in merged:
            if e.get("msg") not in merged[key]["msg"]:
                merged[key]["msg"] += f", or {e.get('msg', '')}"
        else:
            merged[key] = {"loc": loc, "msg": e.get("msg", ""), "type": e.get("type", "")}
    return list(merged.values())


def validation_error(loc: list[Any], msg: str, kind: str = "value_error") -> JSONResponse:
    errors = [{"loc": loc, "msg": msg, "type": kind}]
    return JSONResponse({"detail": errors, "error": _error_line(errors)}, status_code=422)


class BodyLimit:
    """ASGI middleware: read a request body (POST, PUT, PATCH) up to `max_bytes` before the app sees it, and
    refuse larger ones with 413, counting what arrives (a Content-Length can be absent or wrong)."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            return await self._refuse(send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client left before sending its body: nobody to answer
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                return await self._refuse(send)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, send):
        body = json.dumps({"error": f"request body larger than {self.max_bytes} bytes"}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


def create_app(manager: JobManager, limits: Limits | None = None) -> FastAPI:
    """The app for a started or unstarted JobManager (the app's lifespan starts and stops its workers)."""
    from rectiflow import __version__

    limits = limits or Limits()
    GenerateRequest = request_model(limits)
    model_ids = list(manager.pipelines)

    @asynccontextmanager
    async def lifespan(_app):
        manager.start()
        yield
        manager.stop()

    app = FastAPI(title="rectiflow", version=__version__, lifespan=lifespan,
                  description="Text-to-image with rectified-flow transformers: queue jobs, follow their "
                              "progress, fetch PNGs that carry their settings.")
    app.add_middleware(BodyLimit, max_bytes=limits.max_body_bytes)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request, exc: RequestValidationError):
        errors = _merge_union_errors(exc.errors())
        return JSONResponse({"detail": errors, "error": _error_line(errors)}, status_code=422)

    def job_json(job: Job, request_base: str = "") -> dict[str, Any]:
        return {
            "id": job.id, "status": job.status, "progress": round(job.progress, 4), "model": job.model,
            "prompt": job.prompt, "n": job.n, "seed": job.seed,
            "images": [f"{request_base}/v1/images/{key}.png" for key in job.images],
            "settings": job.settings, "verdicts": job.verdicts, "error": job.error,
            "queue_position": manager.queue_position(job),
            "created": job.created, "started": job.started, "finished": job.finished,
        }

    def find(job_id: str) -> Job | JSONResponse:
        job = manager.get(job_id)
        if job is None:
            return JSONResponse({"error": f"no job {job_id!r} (unknown, or forgotten: the server keeps the "
                                          f"last {manager.max_jobs})"}, status_code=404)
        return job

    @app.post("/v1/generate", status_code=202)
    def generate(body: GenerateRequest):  # type: ignore[valid-type]
        model = body.model or model_ids[0]
        if model not in manager.pipelines:
            return validation_error(["body", "model"], f"unknown model {model!r}; this server has: "
                                    f"{', '.join(model_ids)}", "unknown_model")
        available = lora_names(manager.pipelines[model].transformer)
        for i, ref in enumerate(body.loras):
            if ref.id not in available:
                msg = f"unknown LoRA {ref.id!r} for model {model!r}; it has: {', '.join(available) or 'none'}"
                return validation_error(["body", "loras", i, "id"], msg, "unknown_lora")
        if len({ref.id for ref in body.loras}) != len(body.loras):
            return validation_error(["body", "loras"], "a LoRA is named twice", "duplicate_lora")
        d = manager.pipelines[model].defaults
        options = {
            "steps": body.steps or d.steps, "width": body.width or d.width, "height": body.height or d.height,
            "sampler": body.sampler or d.sampler,
            "shift": d.shift if body.shift is None else parse_time_shift(body.shift),
            "cfg_scale": d.cfg_scale if body.cfg is None else body.cfg,
        }
        if body.guidance is not None:
            options["guidance"] = body.guidance
        if body.cfg_interval is not None:
            options["cfg_interval"] = tuple(body.cfg_interval)
        cost = options["width"] * options["height"] * options["steps"] * body.n
        if cost > limits.max_cost:
            return validation_error(
                ["body", "steps"],
                f"width x height x steps x n = {options['width']} x {options['height']} x {options['steps']} "
                f"x {body.n} = {cost} is above this server's cap of {limits.max_cost}; lower the steps, n or "
                "the size", "cost_limit")
        seed = body.seed if body.seed is not None else secrets.randbelow(2**32)
        job = Job(model=model, prompt=body.prompt, seed=seed, n=body.n, options=options,
                  negative_prompt=body.negative_prompt,
                  loras=tuple((ref.id, float(ref.scale)) for ref in body.loras))
        try:
            manager.submit(job)
        except QueueFull as e:
            return JSONResponse({"error": str(e)}, status_code=429,
                                headers={"Retry-After": str(e.retry_after)})
        return JSONResponse({"id": job.id, "url": f"/v1/jobs/{job.id}"}, status_code=202,
                            headers={"Location": f"/v1/jobs/{job.id}"})

    @app.get("/v1/jobs/{job_id}")
    async def get_job(job_id: str, wait: float = Query(0.0, ge=0.0, le=MAX_WAIT_S)):
        job = find(job_id)
        if isinstance(job, JSONResponse):
            return job
        deadline = time.monotonic() + wait
        while job.status not in FINISHED and (left := deadline - time.monotonic()) > 0:
            await manager.wait(job, job.version, left)
        return job_json(job)

    @app.delete("/v1/jobs/{job_id}")
    def cancel_job(job_id: str):
        job = find(job_id)
        if isinstance(job, JSONResponse):
            return job
        return job_json(manager.cancel(job_id) or job)

    @app.get("/v1/jobs/{job_id}/events")
    async def job_events(job_id: str):
        job = find(job_id)
        if isinstance(job, JSONResponse):
            return job

        async def stream():
            sent = -1
            while True:
                version = job.version
                if version != sent:
                    sent = version
                    state = job_json(job)
                    yield f"event: job\ndata: {json.dumps(state)}\n\n"
                    # end on the state sent, not on job.status now: a job that finishes between the two
                    # reads would otherwise end the stream on a "running" event
                    if state["status"] in FINISHED:
                        return
                else:
                    yield ": keep-alive\n\n"
                await manager.wait(job, version, KEEPALIVE_S)

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.get("/v1/images/{key}.png", name="image")
    def image(key: str):
        data = manager.store.get(key)
        if data is None:
            return JSONResponse({"error": f"no image {key!r} (unknown, or dropped from the server's image "
                                          "store, which keeps the most recently used images)"},
                                status_code=404)
        return Response(data, media_type="image/png",
                        headers={"Cache-Control": "private, max-age=86400, immutable"})

    @app.get("/v1/models")
    def models():
        return {"models": [
            {"id": mid, "name": p.name, "model_hash": p.model_hash, "defaults": p.defaults.to_dict(),
             "loras": lora_names(p.transformer)}
            for mid, p in manager.pipelines.items()
        ]}

    @app.get("/v1/status")
    def status():
        return dict(manager.stats(), limits=limits.to_dict(), version=__version__)

    @app.get("/", include_in_schema=False)
    def page():
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app
