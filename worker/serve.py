"""`python -m worker.serve`: an inference server answering chat completions from the queue.

It runs beside the training workers of a host, as a process of its own: run it only on the
hosts that should serve. On a GPU host it first takes one GPU through the same lock files the
workers use (waiting while every GPU trains), and holds it until it stops, so training jobs
see one GPU fewer and the two never share a card's memory; on a CPU host it runs on the CPU
and takes no job slot. It answers one request at a time; more processes (each on its own GPU)
or more hosts answer more at once, all from the one queue (core/inference.py).
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import redis

from core import inference
from core.db import session_scope
from core.settings import Settings, get_settings

log = logging.getLogger("tuneq.serve")

REGISTER_EVERY_S = 2.0
CANCEL_CHECK_S = 0.5


class Reply:
    """The entries of one request's reply stream."""

    def __init__(self, client: redis.Redis, request_id: str):
        self.client = client
        self.key = inference.REPLY + request_id
        self.cancel_key = inference.CANCEL + request_id
        self._checked = 0.0
        self._cancelled = False

    def send(self, kind: str, **data: Any) -> None:
        import json

        pipe = self.client.pipeline()
        pipe.xadd(self.key, {"kind": kind, "data": json.dumps(data)})
        pipe.expire(self.key, inference.REPLY_TTL_S)
        pipe.execute()

    def error(self, status: int, message: str, param: str | None = None, code: str = "inference_error") -> None:
        self.send("error", status=status, message=message, param=param, code=code)

    def cancelled(self) -> bool:
        """The API stopped waiting (its client went away); checked at most every CANCEL_CHECK_S."""
        now = time.monotonic()
        if not self._cancelled and now - self._checked >= CANCEL_CHECK_S:
            self._checked = now
            self._cancelled = bool(self.client.exists(self.cancel_key))
        return self._cancelled


class Server:
    def __init__(self, settings: Settings, client: redis.Redis, cache: Any, server_id: str):
        self.settings = settings
        self.client = client
        self.cache = cache
        self.server_id = server_id
        self.paths: OrderedDict[str, Path] = OrderedDict()  # weights id -> its local directory
        self._registered = 0.0
        self.stopping = False

    def register(self) -> None:
        if time.monotonic() - self._registered >= REGISTER_EVERY_S:
            inference.register_server(self.client, self.server_id, self.settings.registry_ttl_s,
                                      host=self.settings.host_id or socket.gethostname(), device=str(self.cache.device),
                                      models=self.cache.stats())
            self._registered = time.monotonic()

    def run(self) -> None:
        while not self.stopping:
            try:
                self.register()
                item = self.client.blpop([inference.QUEUE], timeout=1)
            except redis.RedisError as exc:
                log.warning("redis: %s; retrying", exc)
                time.sleep(1)
                continue
            if item is None:
                continue
            try:
                self.handle(item[1])
            except redis.RedisError as exc:  # lost while answering: the API times the request out
                log.warning("redis: %s while answering; the request is lost", exc)

    def handle(self, raw: bytes) -> None:
        try:
            req = inference.ChatRequest.loads(raw)
        except (ValueError, TypeError, KeyError) as exc:
            log.warning("dropped a request that does not parse: %s", exc)
            return
        if time.time() > req.deadline:
            log.info("request %s: dropped, its caller stopped waiting", req.id)
            return
        reply = Reply(self.client, req.id)
        try:
            weights = self.weights(req.target)
            with self.cache.lease(req.target.base, weights) as (model, tokenizer):
                from worker.generation import generate

                generate(model, tokenizer, req, reply)
        except LookupError as exc:
            reply.error(404, str(exc), "model", "model_not_found")
        except Exception as exc:  # noqa: BLE001 - the caller gets the reason; this server goes on
            log.exception("request %s failed", req.id)
            reply.error(500, f"the inference server failed: {type(exc).__name__}: {exc}")

    def weights(self, target: inference.Target) -> Any:
        from worker.model_cache import Weights

        if target.weights is None:
            return None
        path = self.paths.get(target.weights)
        if path is None or not path.is_dir():
            from worker.continuation import resolve_init_from

            with session_scope() as db:
                try:
                    path = Path(resolve_init_from(db, target.weights))
                except ValueError as exc:
                    raise LookupError(f"model: {target.model}: {str(exc).removeprefix('from_checkpoint: ')}") from None
            self.paths[target.weights] = path
            while len(self.paths) > 256:
                self.paths.popitem(last=False)
        self.paths.move_to_end(target.weights)
        return Weights(target.weights, path)


def take_gpu(settings: Settings, owner: str) -> Any:
    """On a host of several GPUs: one GPU, locked for this process's life (waits while all of them
    train). A host of one GPU shares it with its jobs: locking the only GPU would leave none to train on."""
    from worker.gpus import GpuPool

    pool = GpuPool.for_host(settings)
    if pool.kind != "gpu":
        return None
    if pool.count < 2:
        log.info("this host has one GPU: serving on it beside the jobs, without taking it from them")
        return None
    while (reservation := pool.reserve(1, owner)) is None:
        log.info("every GPU of this host is busy; waiting for one to serve on")
        time.sleep(5)
    os.environ.update(reservation.env("gpu"))
    return reservation


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m worker.serve", description="Serve chat completions from the queue.")
    parser.add_argument("--loglevel", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.loglevel, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = get_settings()
    server_id = f"{settings.host_id or socket.gethostname()}:{os.getpid()}"
    reservation = take_gpu(settings, f"{inference.SERVER_OWNER}{server_id}")  # before torch sees the GPUs

    import signal

    import torch

    from trainer.model import quiet_libraries
    from worker.model_cache import ModelCache

    quiet_libraries()
    device = torch.device("cuda:0" if torch.cuda.is_available() else "cpu")  # the reserved GPU, or a lone shared one
    cache = ModelCache(device, max_adapters=settings.serve_max_adapters, max_models=settings.serve_max_models)
    client = redis.Redis.from_url(settings.redis_url, socket_connect_timeout=5, socket_timeout=10)
    server = Server(settings, client, cache, server_id)

    def stop(*_: Any) -> None:
        server.stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    log.info("serving chat completions as %s on %s", server_id, device)
    try:
        server.run()
    finally:
        try:
            client.delete(inference.SERVERS + server_id)
        except redis.RedisError:
            pass
    log.info("stopped")


if __name__ == "__main__":
    main()
