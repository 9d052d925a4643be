"""`rectiflow serve` under load on loopback, against the same work done by the pipeline in one process.

    python benchmarks/serve_load.py [--model PATH] [--requests 300] [--clients 24] [--queue 16]
                                    [--max-batch 1] [--rounds 3] [--c1-requests 30] [--threads 1]

Starts `python -m rectiflow serve` (a subprocess on 127.0.0.1, a free port) and drives it with client
threads using http.client (keep-alive, one connection per client). Every request asks for one image with its
own seed; a client POSTs /v1/generate, on 429 waits the Retry-After and tries again, long-polls
GET /v1/jobs/{id}?wait=30 until the job has finished, then fetches the PNG and checks that its metadata
carries the requested prompt and seed (a mixed-up or duplicated job would show). Ends by itself: each phase
has a deadline.

Phases (--rounds times, interleaved): the peer, i.e. what `rectiflow generate` does, one image per pipeline
call in this process (--c1-requests images), then the server with one client (--c1-requests requests).
Then once: the server with --clients concurrent clients for --requests requests (overload: more clients than
queue slots). Reported: images/s of each (median over rounds), their ratio, latency p50/p95 (first attempt
to PNG received), the count of 202/429/other answers, and the checks. Exits 1 if a check fails.
Threads: torch in this process and OMP_NUM_THREADS of the server are both --threads.
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from _common import print_machine_info  # noqa: E402
from rectiflow.convert.bundle import default_bundle_path  # noqa: E402
from rectiflow.sample import Pipeline, read_png_settings  # noqa: E402

SRC = Path(__file__).resolve().parents[1] / "src"
PROMPT = "a photo of a red circle above a blue square"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, port: int, queue: int, max_batch: int, threads: int) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(SRC) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    cmd = [sys.executable, "-m", "rectiflow", "serve", "--model", f"m={model}", "--port", str(port),
           "--queue", str(queue), "--max-batch", str(max_batch), "--device", "cpu", "--dtype", "fp32"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    while True:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/v1/status")
            if conn.getresponse().status == 200:
                return proc
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise SystemExit(f"the server did not start: {proc.stderr.read()}")
        time.sleep(0.3)


class Client:
    """One keep-alive connection; `one(seed)` runs a request to its PNG and returns the latency."""

    def __init__(self, port: int, tally: dict, lock: threading.Lock):
        self.port, self.tally, self.lock = port, tally, lock
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)

    def _call(self, method: str, path: str, body: dict | None = None) -> tuple[int, dict[str, str], bytes]:
        for attempt in range(2):  # a server-closed keep-alive connection is reopened once
            try:
                self.conn.request(method, path, body=json.dumps(body) if body is not None else None,
                                  headers={"Content-Type": "application/json"})
                r = self.conn.getresponse()
                return r.status, dict(r.getheaders()), r.read()
            except (http.client.HTTPException, ConnectionError):
                self.conn.close()
                self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def _count(self, key: str, value=1) -> None:
        with self.lock:
            if isinstance(value, int):
                self.tally[key] = self.tally.get(key, 0) + value
            else:
                self.tally.setdefault(key, []).append(value)

    def one(self, seed: int, deadline: float) -> float:
        t0 = time.perf_counter()
        while True:
            status, headers, data = self._call("POST", "/v1/generate", {"prompt": PROMPT, "seed": seed,
                                                                        "model": "m"})
            if status == 202:
                self._count("202")
                job_id = json.loads(data)["id"]
                self._count("ids", job_id)
                break
            if status == 429:
                self._count("429")
                if time.monotonic() > deadline:
                    raise TimeoutError("no queue slot before the deadline")
                time.sleep(float(headers.get("retry-after", headers.get("Retry-After", "1"))))
                continue
            self._count(f"other {status}")
            raise RuntimeError(f"POST answered {status}: {data[:200]!r}")
        while True:
            status, _, data = self._call("GET", f"/v1/jobs/{job_id}?wait=30")
            job = json.loads(data)
            if status != 200:
                self._count(f"other {status}")
                raise RuntimeError(f"GET job answered {status}")
            if job["status"] in ("done", "failed", "cancelled"):
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} not finished before the deadline")
        if job["status"] != "done":
            self._count("failed jobs")
            raise RuntimeError(f"job {job_id} {job['status']}: {job['error']}")
        status, _, png = self._call("GET", job["images"][0])
        _, settings = read_png_settings(io.BytesIO(png))
        if status != 200 or settings["seed"] != seed or settings["prompt"] != PROMPT:
            self._count("mixed up")
            raise RuntimeError(f"job {job_id}: wrong image (seed {settings['seed']} for {seed})")
        latency = time.perf_counter() - t0
        self._count("latency", latency)
        return latency


def load_phase(port: int, requests: int, clients: int, seed0: int, timeout: float) -> dict:
    """`requests` requests (seeds seed0, seed0 + 1, ...) from `clients` threads; images/s and the tally."""
    tally: dict = {}
    lock = threading.Lock()
    seeds = iter(range(seed0, seed0 + requests))
    errors: list[str] = []
    deadline = time.monotonic() + timeout

    def work():
        client = Client(port, tally, lock)
        while True:
            with lock:
                seed = next(seeds, None)
            if seed is None or time.monotonic() > deadline:
                return
            try:
                client.one(seed, deadline)
            except Exception as e:  # counted and reported; the phase goes on
                with lock:
                    errors.append(f"seed {seed}: {e}")

    threads = [threading.Thread(target=work, daemon=True) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()) + 5)
    elapsed = time.perf_counter() - t0
    done = len(tally.get("latency", []))
    ids = tally.get("ids", [])
    return {"images_per_s": done / elapsed, "elapsed": elapsed, "done": done, "tally": tally,
            "errors": errors, "duplicates": len(ids) - len(set(ids)),
            "hung": sum(t.is_alive() for t in threads)}


def peer_phase(pipe: Pipeline, n: int, seed0: int) -> float:
    """Images/s of `rectiflow generate`'s work in this process: one image per pipeline call."""
    t0 = time.perf_counter()
    for seed in range(seed0, seed0 + n):
        pipe([PROMPT], seed=seed, num_images_per_prompt=1, progress=False)
    return n / (time.perf_counter() - t0)


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="bundle directory (default: the bundled model)")
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--clients", type=int, default=24)
    ap.add_argument("--queue", type=int, default=16)
    ap.add_argument("--max-batch", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--c1-requests", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=900, help="seconds per phase before it gives up")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = args.model or str(default_bundle_path())
    print_machine_info()
    print(f"{'model':>26}: {model}")

    pipe = Pipeline.from_bundle(model, "cpu", torch.float32)
    pipe([PROMPT], seed=0, progress=False)  # warm-up
    port = free_port()
    server = start_server(model, port, args.queue, args.max_batch, args.threads)
    ok = True
    try:
        load_phase(port, 3, 1, 10**6, args.timeout)  # warm-up
        peer, c1 = [], []
        for r in range(args.rounds):
            peer.append(peer_phase(pipe, args.c1_requests, 1000 * r))
            res = load_phase(port, args.c1_requests, 1, 1000 * r, args.timeout)
            c1.append(res["images_per_s"])
            ok &= not res["errors"] and res["done"] == args.c1_requests
        over = load_phase(port, args.requests, args.clients, 10**5, args.timeout)
        peer.append(peer_phase(pipe, args.c1_requests, 5000))
    finally:
        server.terminate()
        server.wait(30)

    t = over["tally"]
    lat = t.get("latency", [])
    checks = {
        "every request finished with its own image": over["done"] == args.requests and not over["errors"],
        "no duplicated job id": over["duplicates"] == 0 and len(t.get("ids", [])) == args.requests,
        "answers only 202 / 429 / 200": not any(k.startswith("other") for k in t),
        "no failed or mixed-up job": not t.get("failed jobs") and not t.get("mixed up"),
        "no client hung": over["hung"] == 0,
    }
    ok &= all(checks.values())
    p, s1 = statistics.median(peer), statistics.median(c1)
    print(f"\nthreads {args.threads}, queue {args.queue}, max batch {args.max_batch}, 1 image per request")
    print(f"  peer (pipeline in this process, one call per image): {p:.2f} images/s "
          f"(median of {len(peer)}: {', '.join(f'{x:.2f}' for x in peer)})")
    print(f"  server, 1 client:   {s1:.2f} images/s = {s1 / p:.2f}x the peer "
          f"(median of {len(c1)}: {', '.join(f'{x:.2f}' for x in c1)})")
    rate = over["images_per_s"]
    print(f"  server, {args.clients} clients, {args.requests} requests: {rate:.2f} images/s = "
          f"{rate / p:.2f}x the peer, {over['elapsed']:.1f} s")
    if lat:
        print(f"    latency (first attempt to PNG): p50 {pct(lat, 0.5):.2f} s, p95 {pct(lat, 0.95):.2f} s")
    print(f"    answers: {t.get('202', 0)} x 202, {t.get('429', 0)} x 429, "
          f"{sum(v for k, v in t.items() if k.startswith('other'))} other")
    for name, passed in checks.items():
        print(f"    {'ok  ' if passed else 'FAIL'} {name}")
    for e in over["errors"][:5]:
        print(f"    error: {e}")
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
