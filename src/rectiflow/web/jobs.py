"""The work behind `rectiflow serve`: a bounded job queue, worker threads running the warm pipelines, and a
byte-bounded LRU store of the PNGs they make. No HTTP here (rectiflow.web.app is the HTTP face), so the
queue and the store are tested on their own.

- A job is one request: one prompt, `n` images with seeds seed .. seed + n - 1, one model, optionally
  LoRAs by server-side id (rectiflow.web.loras switches them on for the job). Alone it runs as
  exactly the pipeline call `rectiflow generate` makes, so its PNGs are byte-identical to the command's.
  With `max_batch > 1` a worker also takes later queued jobs whose settings match (model, LoRAs, size, steps,
  sampler, shift, CFG, guidance) into the same model call, up to `max_batch` images: faster under load, but
  images then equal a lone run only to float rounding (Pipeline's batch-independence, ~1e-5).
- The queue holds at most `queue_size` waiting jobs; `submit` raises QueueFull with a retry estimate.
- Finished jobs are kept (for GET /v1/jobs/{id}) up to `max_jobs`, oldest finished first out; their images
  live in the ImageStore, whose least recently used PNGs are dropped once the total passes its byte cap.
- Threads never touch asyncio objects directly: waiters (long polls, event streams) register a future with
  its loop, and a job's change wakes them with loop.call_soon_threadsafe.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import math
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from rectiflow.errors import RectiflowError

log = logging.getLogger(__name__)

QUEUED, RUNNING, DONE, FAILED, CANCELLED = "queued", "running", "done", "failed", "cancelled"
FINISHED = (DONE, FAILED, CANCELLED)
# Pipeline arguments two jobs must share to run in one model call.
BATCH_KEYS = ("steps", "width", "height", "sampler", "shift", "cfg_scale", "guidance", "cfg_interval")


class QueueFull(RectiflowError):
    """The queue holds `queue_size` jobs; retry after `retry_after` seconds."""

    def __init__(self, queue_size: int, retry_after: int):
        super().__init__(f"the queue is full ({queue_size} jobs waiting); retry in {retry_after} s")
        self.retry_after = retry_after


class JobCancelled(Exception):
    """Raised from the progress callback to stop a running job that was cancelled."""


class ImageStore:
    """PNG bytes by id, least recently used dropped first once the total exceeds `max_bytes`."""

    def __init__(self, max_bytes: int):
        if max_bytes < 1:
            raise RectiflowError(f"the image store needs a positive size, got {max_bytes} bytes")
        self.max_bytes = max_bytes
        self._items: collections.OrderedDict[str, bytes] = collections.OrderedDict()
        self._bytes = 0
        self.evicted = 0
        self._lock = threading.Lock()

    def put(self, data: bytes) -> str:
        if len(data) > self.max_bytes:
            raise RectiflowError(f"an image of {len(data)} bytes does not fit the image store "
                                 f"({self.max_bytes} bytes); start the server with a larger --store-mb")
        key = uuid.uuid4().hex
        with self._lock:
            self._items[key] = data
            self._bytes += len(data)
            while self._bytes > self.max_bytes:
                _, old = self._items.popitem(last=False)
                self._bytes -= len(old)
                self.evicted += 1
        return key

    def get(self, key: str) -> bytes | None:
        with self._lock:
            data = self._items.get(key)
            if data is not None:
                self._items.move_to_end(key)
            return data

    def __contains__(self, key: str) -> bool:
        with self._lock:
            return key in self._items

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"images": len(self._items), "bytes": self._bytes, "max_bytes": self.max_bytes,
                    "evicted": self.evicted}


@dataclass
class Job:
    """One request. `options` are the resolved pipeline keyword arguments (BATCH_KEYS)."""

    model: str
    prompt: str
    seed: int
    n: int
    options: dict[str, Any]
    negative_prompt: str | None = None
    loras: tuple[tuple[str, float], ...] = ()  # (server-side LoRA id, scale) switched on for this job
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    status: str = QUEUED
    progress: float = 0.0
    images: list[str] = field(default_factory=list)  # ImageStore keys
    settings: list[dict[str, Any]] = field(default_factory=list)
    verdicts: list[dict[str, Any] | None] = field(default_factory=list)  # JobManager.annotate's, per image
    error: str | None = None
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    version: int = 0  # bumped on every change; waiters compare it
    cancel_requested: bool = False

    def batch_key(self) -> tuple:
        return (self.model, self.loras, *(repr(self.options.get(k)) for k in BATCH_KEYS))


class JobManager:
    """Queue + workers + store. `pipelines` maps server-side model ids to loaded Pipelines; `settings_extra`
    is added to every image's settings (e.g. the rectiflow version, as `generate` writes it)."""

    def __init__(self, pipelines: dict[str, Any], store: ImageStore, *, queue_size: int = 16,
                 workers: int = 1, max_batch: int = 1, max_jobs: int = 10_000,
                 encode_png: Callable[[Any, dict[str, Any]], bytes] | None = None,
                 settings_extra: dict[str, Any] | None = None,
                 annotate: Callable[[str, Any], dict[str, Any] | None] | None = None):
        if queue_size < 1 or workers < 1 or max_batch < 1 or max_jobs < queue_size:
            raise RectiflowError("queue size, workers and batch size must be >= 1 and max jobs >= queue size")
        if encode_png is None:
            from rectiflow.sample.png import png_bytes as encode_png
        self.pipelines, self.store = pipelines, store
        self.queue_size, self.workers = queue_size, workers
        self.max_batch, self.max_jobs = max_batch, max_jobs
        self.encode_png = encode_png
        self.settings_extra = dict(settings_extra or {})
        self.annotate = annotate  # annotate(prompt, image) -> e.g. the shapes-world verdict, or None
        self._jobs: collections.OrderedDict[str, Job] = collections.OrderedDict()
        self._queue: collections.deque[Job] = collections.deque()
        self._cond = threading.Condition()
        self._waiters: dict[str, list[tuple[asyncio.AbstractEventLoop, asyncio.Future]]] = {}
        self._threads: list[threading.Thread] = []
        # a model whose transformer carries LoRAs runs one job at a time: the adapters' switches are per job
        self._model_locks = {mid: threading.Lock() for mid in pipelines}
        self._stopping = False
        self._running = 0
        self.seconds_per_image = 1.0  # running estimate for Retry-After, updated after each batch
        self.completed_images = 0

    # ---------------------------------------------------------------------------------------- life cycle

    def start(self) -> None:
        with self._cond:
            self._stopping = False
        for i in range(self.workers - len(self._threads)):
            t = threading.Thread(target=self._work, name=f"rectiflow-worker-{i}", daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self, timeout: float = 30.0) -> None:
        """Stop taking jobs; the running batches finish (waiting at most `timeout` s each)."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        for t in self._threads:
            t.join(timeout)
        self._threads.clear()

    # ---------------------------------------------------------------------------------------- the API

    def submit(self, job: Job) -> Job:
        if job.model not in self.pipelines:
            raise RectiflowError(f"unknown model {job.model!r}")
        with self._cond:
            if len(self._queue) >= self.queue_size:
                raise QueueFull(self.queue_size, self._retry_after())
            self._jobs[job.id] = job
            self._queue.append(job)
            self._forget_old_jobs()
            self._cond.notify()
        return job

    def get(self, job_id: str) -> Job | None:
        with self._cond:
            return self._jobs.get(job_id)

    def cancel(self, job_id: str) -> Job | None:
        """Cancel a queued job at once, a running one at its next solver step; finished ones stay as they
        are. Returns the job (None when unknown)."""
        with self._cond:
            job = self._jobs.get(job_id)
            if job is None or job.status in FINISHED:
                return job
            job.cancel_requested = True
            if job.status == QUEUED:
                self._queue.remove(job)
                self._finish(job, CANCELLED, error="cancelled")
        return job

    def queue_position(self, job: Job) -> int | None:
        """0 for the next job to run; None when the job is not waiting."""
        with self._cond:
            try:
                return self._queue.index(job)
            except ValueError:
                return None

    def stats(self) -> dict[str, Any]:
        with self._cond:
            return {"queued": len(self._queue), "running": self._running, "queue_size": self.queue_size,
                    "workers": self.workers, "max_batch": self.max_batch, "jobs_kept": len(self._jobs),
                    "completed_images": self.completed_images,
                    "seconds_per_image": round(self.seconds_per_image, 4), "store": self.store.stats()}

    async def wait(self, job: Job, version: int, timeout: float) -> None:
        """Return once `job.version` differs from `version` or after `timeout` seconds."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        with self._cond:
            if job.version != version:
                return
            self._waiters.setdefault(job.id, []).append((loop, fut))
        try:
            await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError:
            pass
        finally:
            with self._cond:
                waiting = self._waiters.get(job.id, [])
                if (loop, fut) in waiting:
                    waiting.remove((loop, fut))
                if not waiting:
                    self._waiters.pop(job.id, None)

    # ---------------------------------------------------------------------------------------- internals

    def _retry_after(self) -> int:
        images = sum(j.n for j in self._queue)
        # an upper bound: merged batches (max_batch > 1) only make the wait shorter
        return max(1, math.ceil(images * self.seconds_per_image / self.workers))

    def _forget_old_jobs(self) -> None:
        """Drop the oldest finished jobs beyond max_jobs (caller holds the lock)."""
        excess = len(self._jobs) - self.max_jobs
        if excess <= 0:
            return
        for job_id in [k for k, j in self._jobs.items() if j.status in FINISHED][:excess]:
            del self._jobs[job_id]

    def _changed(self, job: Job) -> None:
        """Bump the version and wake the job's waiters (caller holds the lock)."""
        job.version += 1
        for loop, fut in self._waiters.pop(job.id, []):
            loop.call_soon_threadsafe(_resolve, fut)

    def _finish(self, job: Job, status: str, error: str | None = None) -> None:
        job.status, job.error, job.finished = status, error, time.time()
        if status == DONE:
            job.progress = 1.0
        self._changed(job)

    def _take_batch(self) -> list[Job]:
        """The first queued job and, up to max_batch images, later ones with the same batch key (caller
        holds the lock and the queue is not empty)."""
        first = self._queue.popleft()
        batch, images = [first], first.n
        if self.max_batch > 1:
            key = first.batch_key()
            for job in list(self._queue):
                if images + job.n > self.max_batch:
                    break
                if job.batch_key() == key:
                    self._queue.remove(job)
                    batch.append(job)
                    images += job.n
        now = time.time()
        for job in batch:
            job.status, job.started = RUNNING, now
            self._changed(job)
        return batch

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
                batch = self._take_batch()
                self._running += len(batch)
            try:
                self._run(batch)
            finally:
                with self._cond:
                    self._running -= len(batch)

    def _run(self, batch: list[Job]) -> None:
        t0 = time.perf_counter()
        try:
            result = self._generate(batch)
            pngs = [self.encode_png(image, dict(s, **self.settings_extra))
                    for image, s in zip(result.images, result.settings)]
            keys = [self.store.put(p) for p in pngs]
            notes = [self.annotate(s["prompt"], image) if self.annotate else None
                     for image, s in zip(result.images, result.settings)]
        except JobCancelled:
            with self._cond:
                for job in batch:
                    self._finish(job, CANCELLED, error="cancelled")
            return
        except RectiflowError as e:
            self._fail(batch, str(e))
            return
        except Exception as e:  # a bug or a broken model: the job fails, the server keeps serving
            log.exception("job %s failed", batch[0].id)
            self._fail(batch, f"internal error: {type(e).__name__}: {e}")
            return
        elapsed = time.perf_counter() - t0
        with self._cond:
            i = 0
            for job in batch:
                job.images = keys[i:i + job.n]
                job.settings = [dict(s, **self.settings_extra) for s in result.settings[i:i + job.n]]
                job.verdicts = notes[i:i + job.n]
                i += job.n
                self._finish(job, CANCELLED if job.cancel_requested else DONE,
                             error="cancelled" if job.cancel_requested else None)
            # exponential moving average of the per-image time (Retry-After estimates)
            self.seconds_per_image = 0.7 * self.seconds_per_image + 0.3 * elapsed / max(1, len(keys))
            self.completed_images += len(keys)

    def _fail(self, batch: list[Job], message: str) -> None:
        with self._cond:
            for job in batch:
                self._finish(job, FAILED, error=message)

    def _generate(self, batch: list[Job]):
        from rectiflow.nn.lora import has_lora
        from rectiflow.web.loras import activated

        pipe = self.pipelines[batch[0].model]
        lock = self._model_locks[batch[0].model] if has_lora(pipe.transformer) else contextlib.nullcontext()
        with lock, activated(pipe, batch[0].loras):
            return self._call(pipe, batch)

    def _call(self, pipe, batch: list[Job]):
        options = dict(batch[0].options)

        def on_step(done: int, total: int) -> None:
            with self._cond:
                if all(j.cancel_requested for j in batch):
                    raise JobCancelled
                for job in batch:
                    job.progress = min(0.99, done / total)
                    self._changed(job)

        if len(batch) == 1:  # exactly the call `rectiflow generate` makes: same bytes
            job = batch[0]
            return pipe([job.prompt], seed=job.seed, num_images_per_prompt=job.n,
                        negative_prompt=job.negative_prompt, progress=False, callback=on_step, **options)
        prompts = [j.prompt for j in batch for _ in range(j.n)]
        seeds = [j.seed + i for j in batch for i in range(j.n)]
        negatives = None
        if any(j.negative_prompt is not None for j in batch):
            negatives = [j.negative_prompt or "" for j in batch for _ in range(j.n)]
        return pipe(prompts, seeds=seeds, negative_prompt=negatives, progress=False, callback=on_step,
                    **options)


def _resolve(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(None)
