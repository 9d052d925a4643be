"""The job queue and image store without HTTP: LRU by bytes, merged batches, failures, cancellation, the job
record bound."""

import time

import pytest
import torch

from rectiflow.errors import RectiflowError
from rectiflow.sample import Pipeline
from rectiflow.web.jobs import CANCELLED, DONE, FAILED, ImageStore, Job, JobManager, QueueFull

PROMPT = "a photo of a red circle"


def _job(model="tiny", prompt=PROMPT, seed=0, n=1, **options):
    return Job(model=model, prompt=prompt, seed=seed, n=n, options=dict({"steps": 2}, **options))


def _wait(job, status=DONE, timeout=60):
    deadline = time.monotonic() + timeout
    while job.status != status and time.monotonic() < deadline:
        time.sleep(0.01)
    assert job.status == status, (job.status, job.error)


def test_image_store_is_lru_by_bytes():
    store = ImageStore(10)
    a, b = store.put(b"aaaa"), store.put(b"bbbb")
    assert store.get(a) == b"aaaa"  # a is now the most recently used
    c = store.put(b"cccc")
    assert b not in store and a in store and c in store
    assert store.stats() == {"images": 2, "bytes": 8, "max_bytes": 10, "evicted": 1}
    with pytest.raises(RectiflowError, match="does not fit"):
        store.put(b"x" * 11)
    with pytest.raises(RectiflowError, match="positive size"):
        ImageStore(0)


def test_queue_full_and_bad_sizes():
    manager = JobManager({"tiny": object()}, ImageStore(100), queue_size=1)
    manager.submit(_job())
    with pytest.raises(QueueFull) as e:
        manager.submit(_job())
    assert e.value.retry_after >= 1
    with pytest.raises(RectiflowError, match="unknown model"):
        manager.submit(_job(model="other"))
    with pytest.raises(RectiflowError):
        JobManager({}, ImageStore(100), queue_size=0)


def test_compatible_queued_jobs_share_a_model_call(tiny_pipe):
    manager = JobManager({"tiny": tiny_pipe}, ImageStore(10**8), max_batch=4)
    jobs = [_job(seed=0), _job(seed=5, steps=3), _job(prompt="a photo of two squares", seed=1, n=2),
            _job(seed=9), _job(seed=11)]
    for job in jobs:
        manager.submit(job)
    manager.start()
    try:
        for job in jobs:
            _wait(job)
    finally:
        manager.stop()
    merged = [jobs[0], jobs[2], jobs[3]]  # 1 + 2 + 1 images with the first job's settings; jobs[4] overflows
    assert len({j.started for j in merged}) == 1
    assert jobs[1].started != jobs[0].started and jobs[4].started != jobs[0].started
    assert [s["seed"] for s in jobs[2].settings] == [1, 2]
    assert jobs[2].settings[0]["prompt"] == "a photo of two squares" and jobs[1].settings[0]["steps"] == 3
    # merged images equal lone runs up to float rounding (a pixel level or so)
    import io

    import numpy as np
    from PIL import Image

    for job in merged:
        alone = tiny_pipe([job.prompt], seed=job.seed, num_images_per_prompt=job.n, steps=2, progress=False)
        for key, image in zip(job.images, alone.images):
            served = np.asarray(Image.open(io.BytesIO(manager.store.get(key)))).astype(int)
            assert np.abs(served - np.asarray(image).astype(int)).max() <= 2


def test_a_failing_job_fails_alone_and_the_server_goes_on(tiny_bundle, tiny_pipe):
    broken = Pipeline.from_bundle(tiny_bundle, device="cpu", dtype=torch.float32)
    with torch.no_grad():
        for p in broken.transformer.parameters():
            p.fill_(float("nan"))
    manager = JobManager({"broken": broken, "tiny": tiny_pipe}, ImageStore(10**8))
    bad, good = _job(model="broken"), _job()
    manager.submit(bad)
    manager.submit(good)
    manager.start()
    try:
        _wait(bad, FAILED)
        _wait(good, DONE)
    finally:
        manager.stop()
    assert "inf/NaN" in bad.error and bad.images == []


def test_cancel_stops_a_running_job_at_its_next_step(tiny_pipe):
    manager = JobManager({"tiny": tiny_pipe}, ImageStore(10**8))
    job = manager.submit(_job(steps=400))
    manager.start()
    try:
        deadline = time.monotonic() + 60
        while job.progress == 0 and time.monotonic() < deadline:
            time.sleep(0.005)
        manager.cancel(job.id)
        _wait(job, CANCELLED)
        assert job.progress < 1 and job.images == []
        after = manager.submit(_job())
        _wait(after)
    finally:
        manager.stop()
    assert manager.cancel(after.id).status == DONE  # finished jobs stay as they are


def test_finished_jobs_beyond_max_jobs_are_forgotten_oldest_first(tiny_pipe):
    manager = JobManager({"tiny": tiny_pipe}, ImageStore(10**8), queue_size=2, max_jobs=3)
    manager.start()
    try:
        jobs = []
        for seed in range(5):
            jobs.append(manager.submit(_job(seed=seed)))
            _wait(jobs[-1])
    finally:
        manager.stop()
    assert [manager.get(j.id) is not None for j in jobs] == [False, False, True, True, True]
