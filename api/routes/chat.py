"""`POST /v1/chat/completions`: OpenAI's chat completion, whole or streamed as server-sent events.

A model is a base model, a job's `fine_tuned_model` or a checkpoint's
`fine_tuned_model_checkpoint`; one of a job the caller may not read answers 404 like an unknown
one. The answer comes from an inference server through Redis (api/chat.py).
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from api.chat import Call, ChatCompletionRequest, prepare
from api.deps import CurrentUser, SettingsDep
from api.errors import APIError

router = APIRouter(prefix="/v1/chat", tags=["chat"])

STREAM_DOC = {200: {"description": "A chat.completion, or with stream=true a text/event-stream of chat.completion.chunk "
                                   "objects ending with `data: [DONE]`.",
                    "content": {"text/event-stream": {"schema": {"type": "string"}}}}}


def _usage(end: dict[str, Any]) -> dict[str, int]:
    prompt, completion = int(end.get("prompt_tokens", 0)), int(end.get("completion_tokens", 0))
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


@router.post("/completions", responses=STREAM_DOC)
async def create_chat_completion(body: ChatCompletionRequest, user: CurrentUser, settings: SettingsDep) -> Any:
    req = await run_in_threadpool(prepare, body, user, settings)
    call = Call(req, settings)
    try:
        await call.start()
    except BaseException:  # a refusal, or the client went away while the request was queued
        await call.close()
        raise
    head = {"id": f"chatcmpl-{secrets.token_hex(12)}", "created": int(time.time()), "model": body.model,
            "system_fingerprint": None}
    if body.stream:
        usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(_stream(call, head, usage), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})
    text: list[str] = []
    try:
        async for kind, data in call.entries():
            if kind == "delta":
                text.append(data["content"])
            elif kind == "error":
                raise APIError(int(data.get("status") or 500), data.get("message") or "inference failed",
                               param=data.get("param"), code=data.get("code"))
            else:
                end = data
    finally:
        await call.close()
    message = {"role": "assistant", "content": "".join(text), "refusal": None}
    return {**head, "object": "chat.completion", "usage": _usage(end),
            "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": end["finish_reason"]}]}


def _sse(data: dict[str, Any] | str) -> bytes:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n".encode()


async def _stream(call: Call, head: dict[str, Any], include_usage: bool) -> AsyncIterator[bytes]:
    def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
        return _sse({**head, "object": "chat.completion.chunk",
                     "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]})

    try:
        yield chunk({"role": "assistant", "content": ""})
        async for kind, data in call.entries():
            if kind == "delta":
                yield chunk({"content": data["content"]})
            elif kind == "error":
                # The status line is sent; OpenAI's SDK raises on a chunk that carries an error.
                yield _sse({"error": {"message": data.get("message"), "type": "api_error", "param": data.get("param"),
                                      "code": data.get("code")}})
                return
            else:
                yield chunk({}, data["finish_reason"])
                if include_usage:
                    yield _sse({**head, "object": "chat.completion.chunk", "choices": [], "usage": _usage(data)})
        yield _sse("[DONE]")
    finally:
        await call.close()
