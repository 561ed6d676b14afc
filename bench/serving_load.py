"""The serving benchmark's load generator: SGLang's /generate with streamed server-sent events over plain
asyncio (no dependencies), a closed loop at a concurrency or an open loop of Poisson arrivals."""
from __future__ import annotations

import asyncio
import json
import random
import re
import time
from typing import Iterator

from serving_method import Request, Spec



# ---------------------------------------------------------------- the load generator (asyncio, no dependencies)

_EVENT_END = re.compile(rb"\r?\n\r?\n")
_TOKENS_KEY = b'"completion_tokens":'


async def _chunked(reader: asyncio.StreamReader):
    """The body of an HTTP/1.1 response in chunked transfer encoding, chunk by chunk."""
    while True:
        line = await reader.readline()
        if not line:
            return
        size = int(line.split(b";")[0].strip() or b"0", 16)
        if size == 0:
            return
        data = await reader.readexactly(size)
        await reader.readexactly(2)
        yield data


async def _until_eof(reader: asyncio.StreamReader):
    while data := await reader.read(1 << 16):
        yield data


async def http_events(host: str, port: int, path: str, body: bytes, on_event) -> None:
    """POST `body` (JSON) to http://host:port/path and hand each server-sent event's payload to on_event; an
    HTTP error raises RuntimeError with the server's answer. One connection per request, closed on return or
    cancellation (a cancelled request is dropped by the server)."""
    reader, writer = await asyncio.open_connection(host, port, limit=1 << 24)
    try:
        writer.write(b"POST %s HTTP/1.1\r\nHost: %s:%d\r\nContent-Type: application/json\r\n"
                     b"Accept: text/event-stream\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
                     % (path.encode(), host.encode(), port, len(body)) + body)
        await writer.drain()
        status = (await reader.readline()).split()
        headers = {}
        while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip().lower()
        body_iter = _chunked(reader) if "chunked" in headers.get("transfer-encoding", "") else _until_eof(reader)
        code = int(status[1]) if len(status) > 1 else 0
        if code != 200:
            text = b"".join([d async for d in body_iter])
            raise RuntimeError(f"HTTP {code}: {text[:400].decode(errors='replace')}")
        buf = b""
        async for data in body_iter:
            buf += data
            while m := _EVENT_END.search(buf):
                on_event(buf[:m.start()])
                buf = buf[m.end():]
        if buf.strip():
            on_event(buf)
    finally:
        writer.close()


def completion_tokens(event: bytes) -> int | None:
    """The cumulative completion_tokens an SGLang /generate stream event carries (None: none)."""
    i = event.rfind(_TOKENS_KEY)
    if i < 0:
        return None
    m = re.match(rb"\s*(\d+)", event[i + len(_TOKENS_KEY):])
    return int(m.group(1)) if m else None


async def send_request(host: str, port: int, spec: Spec, t0: float, sink: list[Request]) -> Request:
    """One streamed /generate request (greedy, ignore_eos: exactly spec.output_len tokens), recorded in sink."""
    req = Request(spec.index, len(spec.input_ids), spec.output_len, time.perf_counter() - t0)
    sink.append(req)
    body = json.dumps({"input_ids": spec.input_ids, "stream": True, "sampling_params": {
        "max_new_tokens": spec.output_len, "temperature": 0.0, "ignore_eos": True}}).encode()

    def on_event(event: bytes) -> None:
        event = event.strip()
        if event.startswith(b"data:"):
            event = event[5:].strip()
        if not event or event == b"[DONE]":
            return
        n = completion_tokens(event)
        if n is None:
            if b'"error"' in event:
                req.error = event[:300].decode(errors="replace")
            return
        if not req.chunks or n > req.chunks[-1][1]:
            req.chunks.append((time.perf_counter() - t0, n))

    try:
        await http_events(host, port, "/generate", body, on_event)
        req.end = time.perf_counter() - t0
        got = req.chunks[-1][1] if req.chunks else 0
        if got < spec.output_len and not req.error:
            req.error = f"the stream ended after {got} of {spec.output_len} tokens"
    except (OSError, RuntimeError, asyncio.IncompleteReadError, ValueError) as e:
        req.error = f"{type(e).__name__}: {e}"[:300]
    return req


async def closed_loop(host: str, port: int, specs: Iterator[Spec], concurrency: int, duration: float,
                      t0: float) -> list[Request]:
    """`concurrency` clients, each sending its next request when the last one ends, until `duration` s after
    t0; requests still running then are cut (cancelled: no end, no error)."""
    sink: list[Request] = []

    async def client() -> None:
        while time.perf_counter() - t0 < duration:
            req = await send_request(host, port, next(specs), t0, sink)
            if req.error:
                await asyncio.sleep(0.5)  # a server refusing everything must not spin the loop

    tasks = [asyncio.create_task(client()) for _ in range(concurrency)]
    await asyncio.wait(tasks, timeout=max(0.0, duration - (time.perf_counter() - t0)))
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return sink


def early_misses(sink: list[Request], now: float, lo: float, ttft_slo: float) -> int:
    """Requests sent from lo on that already missed the TTFT SLO (or failed)."""
    n = 0
    for r in sink:
        if r.sent < lo:
            continue
        first = r.chunks[0][0] - r.sent if r.chunks else None
        if r.error or (first is not None and first > ttft_slo) or (first is None and now - r.sent > ttft_slo):
            n += 1
    return n


async def open_loop(host: str, port: int, specs: Iterator[Spec], rate: float, duration: float, t0: float, *,
                    seed: int, drain_s: float, lo: float, ttft_slo: float,
                    allowed_misses: float) -> tuple[list[Request], bool]:
    """Poisson arrivals at `rate` per second for `duration` s, then up to drain_s for the last ones to finish.
    Stops early (True) once more than allowed_misses requests of the window already missed the TTFT SLO: the
    rate fails whatever follows."""
    rng = random.Random(f"arrivals:{seed}")
    sink: list[Request] = []
    tasks: list[asyncio.Task] = []
    at = rng.expovariate(rate)
    stopped = False
    while at < duration:
        delay = at - (time.perf_counter() - t0)
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(send_request(host, port, next(specs), t0, sink)))
        if early_misses(sink, time.perf_counter() - t0, lo, ttft_slo) > allowed_misses:
            stopped = True
            break
        at += rng.expovariate(rate)
    if tasks and not stopped:
        await asyncio.wait(tasks, timeout=drain_s)
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return sink, stopped
