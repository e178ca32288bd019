"""The HTTP reward server, `rlhf serve`: FastAPI on uvicorn, base64 PNG/JPEG in JSON, dynamic batching of
concurrent requests, optional bearer token, a request size limit; a bad request never takes it down."""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import io
import json
import math
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Sequence

import numpy as np
import torch
import uvicorn
from fastapi import FastAPI, HTTPException, Request
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from rlhf.config import parse_config
from rlhf.rewards.reward_fn import LocalReward, load_scorer

IMAGE_FORMATS = ("PNG", "JPEG")
# a decoded image larger than this is refused before its pixels are decompressed (decompression bombs)
MAX_IMAGE_PIXELS = 4096 * 4096
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
# what the server answers, as /info lists it (and the README documents)
ROUTES = {
    "POST /score": 'body {"images": [base64 PNG/JPEG, ...], "prompts": [str, ...]} -> {"rewards": [...], '
                   '"scores": {perspective: [...]}, "normalized": {perspective: [...]}} (null for a non-finite value); '
                   "400 malformed JSON, 401 missing/wrong token, 413 body too large, 422 a bad field or image",
    "GET /info": "the model, perspectives, weighting, limits and these routes",
    "GET /health": '{"status": "ok"} (no token needed)',
}


@dataclass
class ServeConfig:
    """`rlhf serve` options.

    Fields:
        model: a saved `reward.RewardModel` directory, or `builtin:NAME` for a weight-free built-in (e.g.
            `builtin:toy_oracles`, three perspectives) to run the server without a model. Required.
        host: interface to bind, default 127.0.0.1 (loopback only; bind elsewhere only behind a token).
        port: default 8000.
        token_file: a file holding the bearer token clients must send (`Authorization: Bearer ...`);
            default None = no authentication.
        max_batch_size: most images scored in one forward pass, gathered from concurrent requests; default 32.
        max_wait_ms: how long the first request of a batch waits for batch-mates; default 10.
        max_request_bytes: largest request body accepted (413 beyond); default 32 MiB.
        weighting: the server's weighting (the `weighting:` block), reported by /info and applied to the
            `rewards` it returns; clients may fold the raw `scores` their own way. Default: every perspective 1.
        device: where the model runs (e.g. "cuda"); default: where it loads.
    """

    model: str = field(metadata={"help": "reward model directory, or builtin:NAME"})
    host: str = field(default="127.0.0.1", metadata={"help": "interface to bind (loopback by default)"})
    port: int = field(default=8000, metadata={"help": "port to listen on"})
    token_file: str | None = field(default=None, metadata={"help": "file holding the bearer token"})
    max_batch_size: int = field(default=32, metadata={"help": "most images per forward pass"})
    max_wait_ms: float = field(default=10.0, metadata={"help": "wait for batch-mates, in ms"})
    max_request_bytes: int = field(default=32 * 1024 * 1024, metadata={"help": "largest request body, bytes"})
    weighting: dict = field(default_factory=dict, metadata={"help": "the weighting block (YAML or JSON)"})
    device: str | None = field(default=None, metadata={"help": "device for the model"})

    def __post_init__(self) -> None:
        check_limits(self.max_batch_size, self.max_wait_ms, self.max_request_bytes)
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port: expected 0..65535, got {self.port}")


def check_limits(max_batch_size: int, max_wait_ms: float, max_request_bytes: int) -> None:
    """Raise a ValueError naming the first server limit that is out of range."""
    for name, value in (("max_batch_size", max_batch_size), ("max_request_bytes", max_request_bytes)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: expected an integer >= 1, got {value!r}")
    if isinstance(max_wait_ms, bool) or not isinstance(max_wait_ms, (int, float)) or not max_wait_ms >= 0:
        raise ValueError(f"max_wait_ms: expected a number >= 0, got {max_wait_ms!r}")


@dataclass
class _Job:
    """One request's decoded images waiting for a batch."""

    pixels: Tensor
    prompts: list[str]
    future: asyncio.Future


class _Batcher:
    """Gathers concurrent requests into batches of at most `max_batch_size` images (a larger request is its own
    batch) and scores each batch in one worker thread, so the event loop keeps accepting requests meanwhile."""

    def __init__(self, reward: LocalReward, max_batch_size: int, max_wait_ms: float) -> None:
        self.reward = reward
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1000.0
        self.queue: asyncio.Queue[_Job] = asyncio.Queue()
        self._held: _Job | None = None  # a job that did not fit the previous batch goes first in the next
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="score")
        self.batches = 0

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            jobs = await self._next_batch(loop)
            try:
                outcomes = await loop.run_in_executor(self._executor, self._score, jobs)
            except Exception as exc:  # noqa: BLE001 - fail this batch's requests, keep serving the next ones
                outcomes = [exc] * len(jobs)
            self.batches += 1
            for job, outcome in zip(jobs, outcomes):
                if job.future.done():  # the client went away
                    continue
                if isinstance(outcome, BaseException):
                    job.future.set_exception(outcome)
                else:
                    job.future.set_result(outcome)

    async def _next_batch(self, loop: asyncio.AbstractEventLoop) -> list[_Job]:
        if self._held is not None:
            first, self._held = self._held, None
        else:
            first = await self.queue.get()
        jobs, count = [first], len(first.prompts)
        deadline = loop.time() + self.max_wait_s
        while count < self.max_batch_size:
            try:
                job = self.queue.get_nowait()
            except asyncio.QueueEmpty:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    job = await asyncio.wait_for(self.queue.get(), remaining)
                except asyncio.TimeoutError:
                    break
            if count + len(job.prompts) > self.max_batch_size:
                self._held = job
                break
            jobs.append(job)
            count += len(job.prompts)
        return jobs

    def _score(self, jobs: list[_Job]) -> list[dict | BaseException]:
        """Score jobs together (one forward per image size); if a batch fails, each job is retried alone so
        only the faulty one fails."""
        outcomes: list[dict | BaseException | None] = [None] * len(jobs)
        by_size: dict[tuple[int, int], list[int]] = {}
        for index, job in enumerate(jobs):
            by_size.setdefault(tuple(job.pixels.shape[-2:]), []).append(index)
        for indices in by_size.values():
            try:
                raw = self.reward.scores(
                    torch.cat([jobs[i].pixels for i in indices]), [p for i in indices for p in jobs[i].prompts]
                )
            except Exception:  # noqa: BLE001 - a batch-mate may be at fault: find out one job at a time
                for i in indices:
                    outcomes[i] = self._score_alone(jobs[i])
                continue
            start = 0
            for i in indices:
                stop = start + len(jobs[i].prompts)
                outcomes[i] = self._reply({name: scores[start:stop] for name, scores in raw.items()}, jobs[i].prompts)
                start = stop
        return outcomes

    def _score_alone(self, job: _Job) -> dict | BaseException:
        try:
            raw = self.reward.scores(job.pixels, job.prompts)
        except Exception as exc:  # noqa: BLE001 - returned to this request only
            return exc
        return self._reply(raw, job.prompts)

    def _reply(self, raw: dict[str, Tensor], prompts: list[str]) -> dict | BaseException:
        """One request's answer: its raw scores folded by the server's weighting (or the error doing so)."""
        try:
            folded = self.reward.weighting(raw, prompts)
        except Exception as exc:  # noqa: BLE001 - returned to this request only
            return exc
        return {
            "rewards": _json_floats(folded.total),
            "scores": {name: _json_floats(scores) for name, scores in raw.items()},
            "normalized": {name: _json_floats(scores) for name, scores in folded.normalized.items()},
        }

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def create_app(
    reward: LocalReward,
    model_name: str,
    token: str | None = None,
    max_batch_size: int = 32,
    max_wait_ms: float = 10.0,
    max_request_bytes: int = 32 * 1024 * 1024,
) -> FastAPI:
    """The FastAPI app serving `reward` (its weighting applies to the `rewards` field); its routes are `ROUTES`.

    Errors: 400 malformed JSON, 401 missing/wrong token, 413 body too large, 422 a bad field or image.
    """
    check_limits(max_batch_size, max_wait_ms, max_request_bytes)
    state: dict[str, _Batcher] = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        batcher = _Batcher(reward, max_batch_size, max_wait_ms)
        state["batcher"] = batcher
        task = asyncio.create_task(batcher.run())
        yield
        task.cancel()
        batcher.close()

    app = FastAPI(title="LLaVA-Reward server", lifespan=lifespan)

    def authorize(request: Request) -> None:
        if token is None:
            return
        sent = request.headers.get("authorization", "")
        if not hmac.compare_digest(sent.encode(), f"Bearer {token}".encode()):
            raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/info")
    async def info(request: Request) -> dict:
        authorize(request)
        return {
            "model": model_name,
            "perspectives": reward.perspectives,
            "weighting": reward.weighting.to_config(),
            "max_batch_size": max_batch_size,
            "max_wait_ms": max_wait_ms,
            "max_request_bytes": max_request_bytes,
            "image_formats": [fmt.lower() for fmt in IMAGE_FORMATS],
            "batches_scored": state["batcher"].batches,
            "routes": ROUTES,
        }

    @app.post("/score")
    async def score(request: Request) -> dict:
        authorize(request)
        body = await _read_body(request, max_request_bytes)
        try:
            payload = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise HTTPException(400, f"malformed JSON: {exc}") from exc
        encoded, prompts = _validated_payload(payload)
        pixels = await asyncio.to_thread(_decode_batch, encoded)
        future = asyncio.get_running_loop().create_future()
        await state["batcher"].queue.put(_Job(pixels, prompts, future))
        try:
            return await future
        except (ValueError, TypeError) as exc:
            raise HTTPException(422, str(exc)) from exc

    return app


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise HTTPException(413, f"request body of {declared} bytes exceeds the limit of {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:  # a body without (or with a false) Content-Length is cut off as it streams
            raise HTTPException(413, f"request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _validated_payload(payload: Any) -> tuple[list[str], list[str]]:
    if not isinstance(payload, dict):
        raise HTTPException(422, "expected a JSON object with 'images' and 'prompts'")
    unknown = sorted(set(payload) - {"images", "prompts", "metadata"})
    if unknown:
        raise HTTPException(422, f"unknown field(s) {unknown}; expected 'images', 'prompts' (and 'metadata')")
    images, prompts = payload.get("images"), payload.get("prompts")
    if not isinstance(images, list) or not images or not all(isinstance(item, str) for item in images):
        raise HTTPException(422, "images: expected a non-empty list of base64-encoded PNG or JPEG strings")
    if not isinstance(prompts, list) or not all(isinstance(item, str) for item in prompts):
        raise HTTPException(422, "prompts: expected a list of strings")
    if len(prompts) != len(images):
        raise HTTPException(
            422, f"prompts: got {len(prompts)} prompts for {len(images)} images; expected one per image"
        )
    return images, prompts


def _decode_batch(encoded: Sequence[str]) -> Tensor:
    """Base64 PNG/JPEG strings -> float BCHW in [0, 1]; a bad image is a 422 naming its index."""
    arrays = [_decode_image(item, f"images[{i}]") for i, item in enumerate(encoded)]
    sizes = {array.shape[:2] for array in arrays}
    if len(sizes) != 1:
        raise HTTPException(422, f"images: all images of a request must share one size, got {sorted(sizes)}")
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255.0


def _decode_image(item: str, where: str) -> np.ndarray:
    try:
        data = base64.b64decode(item, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise HTTPException(422, f"{where}: not valid base64 ({exc})") from exc
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.format not in IMAGE_FORMATS:
                raise HTTPException(422, f"{where}: expected PNG or JPEG, got {image.format}")
            if image.width * image.height > MAX_IMAGE_PIXELS:
                raise HTTPException(422, f"{where}: {image.width}x{image.height} exceeds {MAX_IMAGE_PIXELS} pixels")
            return np.asarray(image.convert("RGB"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError, SyntaxError) as exc:
        raise HTTPException(422, f"{where}: cannot decode the image ({exc})") from exc


def _json_floats(values: Tensor) -> list[float | None]:
    return [value if math.isfinite(value) else None for value in values.detach().cpu().double().tolist()]


class BackgroundServer:
    """A uvicorn server for `app` in a background thread on a free port (tests, benchmarks, notebooks).

    `with BackgroundServer(app) as server: RemoteReward(server.url)`.
    """

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0) -> None:
        self._socket = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.bind((host, port))
        self.port = self._socket.getsockname()[1]
        self.url = f"http://{host}:{self.port}"
        self._server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._socket]}, daemon=True)

    def __enter__(self) -> BackgroundServer:
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the reward server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=30)
        self._socket.close()


def main(argv: list[str] | None = None) -> int:
    """`rlhf serve --model DIR|builtin:NAME [--host 127.0.0.1] [--port 8000] [--token_file F] ...`."""
    (config,) = parse_config(ServeConfig, argv)
    token = None
    if config.token_file is not None:
        path = Path(config.token_file)
        if not path.is_file():
            raise FileNotFoundError(f"token_file: no such file {path}")
        token = path.read_text().strip()
        if not token:
            raise ValueError(f"token_file: {path} is empty")
    if config.host not in LOOPBACK_HOSTS and token is None:
        print(f"rlhf serve: warning: listening on {config.host} without a token; anyone who reaches it can use it",
              file=sys.stderr)
    scorer = load_scorer(config.model, device=config.device)
    reward = LocalReward(scorer, weighting=config.weighting or None, batch_size=config.max_batch_size)
    app = create_app(
        reward,
        model_name=config.model,
        token=token,
        max_batch_size=config.max_batch_size,
        max_wait_ms=config.max_wait_ms,
        max_request_bytes=config.max_request_bytes,
    )
    uvicorn.run(app, host=config.host, port=config.port, log_level="info")
    return 0
