"""Chat completions in OpenAI's shape: the request body, its checks, and the wait for the answer.

The checks that need the database or a tokenizer run once, on a thread (`prepare`); after them
the request is only Redis traffic on the event loop (`Call`): no thread and no database
connection is held while an inference server works on it (core/inference.py).
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated, Any, Literal

import redis
import redis.asyncio as aioredis
from pydantic import BaseModel, ConfigDict, Field, field_validator

from api.errors import APIError
from core import inference, workers
from core.db import session_scope
from core.models import User
from core.settings import Settings

log = logging.getLogger("tuneq.api")


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant"]
    content: Annotated[str | list[TextPart], Field(description="Text, or a list of text parts (no images).")]
    name: str | None = None

    def plain(self) -> dict[str, str]:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        # "developer" is OpenAI's newer name of the system role; chat templates know "system".
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


# A bound on the request's own numbers; what the service generates per request is a setting
# (TUNEQ_CHAT_MAX_TOKENS), checked after parsing so its refusal can say the current cap.
MAX_TOKENS_BOUND = 1_048_576


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """OpenAI's chat completion body; fields tuneq cannot honour are refused, not ignored."""

    model_config = ConfigDict(extra="forbid")
    model: str = Field(min_length=1, max_length=512, description="A base model, a job's `fine_tuned_model` or a checkpoint's `fine_tuned_model_checkpoint`.")
    messages: list[ChatMessage] = Field(min_length=1, max_length=1000)
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_BOUND, strict=True, description="Most tokens to generate (default: TUNEQ_CHAT_MAX_TOKENS, cut to the context).")
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_BOUND, strict=True, description="OpenAI's newer name of max_tokens.")
    temperature: float = Field(1.0, ge=0, le=2, strict=True, description="0: greedy decoding (the same answer every time).")
    top_p: float = Field(1.0, gt=0, le=1, strict=True)
    n: int = Field(1, ge=1, le=1, strict=True, description="Only one choice per request.")
    stream: bool = Field(False, strict=True)
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = Field(None, description="Up to 4 sequences that end the answer (not included).")
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1, strict=True)
    presence_penalty: float | None = Field(None, ge=0, le=0, description="Only 0 (no penalty) is supported.")
    frequency_penalty: float | None = Field(None, ge=0, le=0, description="Only 0 (no penalty) is supported.")
    user: str | None = Field(None, max_length=256, description="Accepted and not used.")

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else (value or [])
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences")
        if any(not s for s in stops):
            raise ValueError("a stop sequence may not be empty")
        return value

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


def prepare(body: ChatCompletionRequest, user: User, settings: Settings) -> inference.ChatRequest:
    """The queued request, or APIError: an unknown model (404), a prompt or max_tokens the
    model's context cannot hold (400), no inference server running (503). Runs on a thread."""
    with session_scope() as db:
        try:
            target = inference.resolve_target(db, user, body.model, settings)
        except inference.UnknownModel:
            raise APIError(404, f"model: the model {body.model!r} does not exist or you do not have access to it",
                           param="model", code="model_not_found") from None
    messages = [m.plain() for m in body.messages]
    asked = body.max_tokens if body.max_tokens is not None else body.max_completion_tokens
    param = "max_tokens" if body.max_tokens is not None else "max_completion_tokens"
    if asked is not None and asked > settings.chat_max_tokens:
        raise APIError(400, f"{param}: {asked} is more than this service generates per request ({settings.chat_max_tokens}, "
                       "TUNEQ_CHAT_MAX_TOKENS)", param=param, code="invalid_value")
    max_tokens = asked or settings.chat_max_tokens
    if target.context is not None and Path(target.base).is_dir():
        from api.data_check import model_tokenizer
        from trainer.data.tokenize import chat_prompt_ids
        from trainer.errors import ModelError

        try:
            prompt = len(chat_prompt_ids(model_tokenizer(target.base), messages))
        except ModelError as exc:
            raise APIError(400, str(exc), param="model", code="model_unusable") from None
        except Exception as exc:  # noqa: BLE001 - a chat template refusing the conversation
            raise APIError(400, f"messages: the model's chat template refused them: {exc}", param="messages",
                           code="invalid_value") from None
        room = target.context - prompt
        if room <= 0:
            raise APIError(400, f"messages: the prompt has {prompt} tokens; model {body.model} reads at most "
                           f"{target.context}", param="messages", code="context_length_exceeded")
        if asked is not None and asked > room:
            raise APIError(400, f"{param}: {asked} tokens do not fit: the prompt has {prompt} of the model's "
                           f"{target.context}, which leaves {room}", param=param, code="context_length_exceeded")
        max_tokens = min(max_tokens, room)
    try:
        servers = inference.server_entries(workers.client())
    except redis.RedisError as exc:
        log.warning("chat: Redis: %s", exc)
        raise APIError(503, "the queue (Redis) is unreachable; retry shortly", code="queue_unavailable",
                       headers={"Retry-After": "2"}) from None
    if not servers:
        raise APIError(503, "no inference server is running; start `python -m worker.serve` on a worker host",
                       code="no_inference_server", headers={"Retry-After": "5"})
    return inference.ChatRequest(
        id=secrets.token_hex(12), target=target, messages=messages, max_tokens=max_tokens,
        temperature=body.temperature, top_p=body.top_p, stop=body.stops(), seed=body.seed,
        deadline=time.time() + settings.chat_queue_timeout_s,
    )


BLOCK_S = 5.0


class Call:
    """One request on the queue and its reply stream, read on the event loop."""

    def __init__(self, req: inference.ChatRequest, settings: Settings):
        self.req = req
        self.settings = settings
        self.key = inference.REPLY + req.id
        self.last = "0"
        # Reads wait up to BLOCK_S inside Redis, so a read may take that long plus the round trip.
        self.redis = aioredis.Redis.from_url(settings.redis_url, socket_connect_timeout=5, socket_timeout=BLOCK_S + 10)
        self.done = False

    async def start(self) -> dict[str, Any]:
        """Queue the request and wait for its start: the `start` entry's data, or APIError.
        The caller closes the call in any case."""
        try:
            await self.redis.rpush(inference.QUEUE, self.req.dumps())
            entry = await self._next(self.settings.chat_queue_timeout_s)
        except redis.RedisError as exc:
            log.warning("chat: Redis: %s", exc, exc_info=True)
            raise APIError(503, "the queue (Redis) is unreachable; retry shortly", code="queue_unavailable",
                           headers={"Retry-After": "2"}) from None
        if entry is None:
            raise APIError(503, f"no inference server started the request within {self.settings.chat_queue_timeout_s:.0f} s "
                           "(TUNEQ_CHAT_QUEUE_TIMEOUT_S); the servers are busy or gone", code="inference_timeout",
                           headers={"Retry-After": "5"})
        kind, data = entry
        if kind == "error":
            raise APIError(int(data.get("status") or 500), data.get("message") or "inference failed",
                           param=data.get("param"), code=data.get("code"))
        return data

    async def entries(self) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        """("delta", {content}) ... then ("end", {...}) or ("error", {...})."""
        while True:
            entry = await self._next(self.settings.chat_idle_timeout_s)
            if entry is None:
                yield "error", {"status": 504, "message": f"the inference server sent nothing for "
                                f"{self.settings.chat_idle_timeout_s:.0f} s (TUNEQ_CHAT_IDLE_TIMEOUT_S)", "code": "inference_timeout"}
                return
            yield entry
            if entry[0] in ("end", "error"):
                self.done = True
                return

    async def _next(self, timeout_s: float) -> tuple[str, dict[str, Any]] | None:
        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0:
            # Short blocks: a cancelled request (client gone) is noticed between them.
            got = await self.redis.xread({self.key: self.last}, count=1, block=int(min(left, BLOCK_S) * 1000) or 1)
            if got:
                _, items = got[0]
                entry_id, fields = items[0]
                self.last = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
                return fields[b"kind"].decode(), json.loads(fields[b"data"])
        return None

    async def close(self) -> None:
        """Tell the server to stop (when the answer did not end) and drop the reply stream."""
        try:
            if not self.done:
                await self.redis.set(inference.CANCEL + self.req.id, "1", ex=inference.REPLY_TTL_S)
            await self.redis.delete(self.key)
        except (redis.RedisError, asyncio.CancelledError):
            pass
        finally:
            await self.redis.aclose()
