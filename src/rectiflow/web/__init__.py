"""rectiflow.web: `rectiflow serve`, an HTTP API and a page over warm pipelines (user docs: docs/serve.md).

    jobs.JobManager(pipelines, ImageStore(max_bytes), queue_size=, workers=, max_batch=)  the work
    app.create_app(manager, Limits(...)) -> FastAPI                                      the HTTP face
    rectiflow.sample.model_ids.load_pipelines(["default", "name=path/to/bundle"], device, dtype)
    server.serve(pipelines, host=, port=, ...)                                           uvicorn

Nothing is imported at package import: FastAPI and torch load only when a server is built.
"""
