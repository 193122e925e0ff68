"""A FastAPI app that hands slow work to tinymq's async executors.

``POST /webhooks`` accepts a delivery and answers at once with its job id; an
``async def`` executor delivers it on the queue's own event loop (no worker
thread is held while it awaits), at most 50 at a time, 10 s each:

- a 404 from the receiver is final: ``PermanentFailure`` (no retries);
- a 429 asks to come back later: ``RetryAfter(seconds)`` replaces the backoff;
- ``DELETE /webhooks/{id}`` cancels a delivery, queued or running.

The app awaits ``aenqueue`` and ``astop``, which never block the server's loop.
The queue lives as long as the app (FastAPI's lifespan).

Run the demo (in-process, no network; needs ``pip install fastapi httpx``):
    python examples/fastapi_app.py
or serve it from the checkout's root (``pip install uvicorn``): ``uvicorn examples.fastapi_app:app``.
A recent Starlette (FastAPI's base) prints ``StarletteDeprecationWarning: Using `httpx` with
`starlette.testclient` is deprecated; install `httpx2` instead.`` first: harmless here, and
``pip install httpx2`` makes it go away.
"""
import asyncio
import time
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Dict

from fastapi import FastAPI, HTTPException

from tinymq import Job, JobContext, PermanentFailure, Queue, RetryAfter, RetryConfig

queue = Queue(1000)
outcomes: Dict[str, str] = {}  # job id -> "delivered" or why it failed


async def send(url: str, attempt: int) -> int:
    """Stands in for an HTTP client call (httpx.AsyncClient.post): the receiver's status."""
    await asyncio.sleep(0.01)
    if url.endswith("/gone"):
        return 404
    if url.endswith("/busy") and attempt == 0:
        return 429
    if url.endswith("/slow"):
        await asyncio.sleep(3600)
    return 200


@queue.executor("webhook", max_concurrent_jobs=50, timeout=10.0)
async def deliver(job: Job, ctx: JobContext) -> None:
    status = await send(job.payload["url"], job.retries)
    if status == 404:
        raise PermanentFailure(f"HTTP 404 from {job.payload['url']}")
    if status == 429:
        raise RetryAfter(0.05, "HTTP 429: too many requests")
    outcomes[job.id] = "delivered"


@queue.on_failure
def failed(job: Job, reason: str, exc: Any) -> None:
    outcomes[job.id] = reason


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    queue.start_dispatcher()
    yield
    await queue.astop(timeout=5.0)  # running deliveries get 5 s, then are cancelled (and kept)


app = FastAPI(lifespan=lifespan)


@app.post("/webhooks", status_code=202)
async def create(body: Dict[str, str]) -> Dict[str, str]:
    retry = RetryConfig(max_retries=3, initial_delay=1.0)
    job = await queue.aenqueue(Job("webhook", {"url": body["url"]}, retry_config=retry))
    return {"id": job.id}


@app.get("/webhooks/{job_id}")
async def status(job_id: str) -> Dict[str, str]:
    return {"id": job_id, "outcome": outcomes.get(job_id, "pending")}


@app.delete("/webhooks/{job_id}")
async def cancel(job_id: str) -> Dict[str, str]:
    if not queue.cancel(job_id):
        raise HTTPException(404, f"no unfinished delivery {job_id}")
    return {"id": job_id, "outcome": "cancelled"}


def demo() -> None:
    from fastapi.testclient import TestClient  # calls the app in-process: no server, no network

    with TestClient(app) as client:
        ids = {url: client.post("/webhooks", json={"url": f"https://example.invalid/{url}"}).json()["id"]
               for url in ("ok", "gone", "busy", "slow")}
        while client.get(f"/webhooks/{ids['busy']}").json()["outcome"] == "pending":
            time.sleep(0.01)
        print("cancel slow:", client.delete(f"/webhooks/{ids['slow']}").json()["outcome"])
        print("cancel again:", client.delete(f"/webhooks/{ids['slow']}").status_code)
        for url, job_id in ids.items():
            print(f"{url}: {client.get(f'/webhooks/{job_id}').json()['outcome']}")
        print("cancelled:", queue.get_stats().jobs_cancelled)


if __name__ == "__main__":
    demo()
