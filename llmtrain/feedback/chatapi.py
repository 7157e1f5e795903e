"""The chat page of the ranking app: a signed-in person talks to one of the models that
`feedback serve --model NAME=CKPT` serves, and the answer streams in as it is generated.

- GET /chat: the page (templates/chat.html, static/chat.js).
- POST /api/chat {"model", "messages": [{"role": "user" | "assistant", "content"}...],
  "temperature", "top_p", "max_new_tokens"} (CSRF like every write): the answer as server-sent
  events (text/event-stream): `queued` {"id", "ahead"}, `start` {"dropped", "cut", "room", "ctx"},
  `token` {"text"}... and one of `done` {"text", "finished", "n_tokens"}, `stopped` {"text",
  "n_tokens"} or `error` {"error"}. The history lives in the page and comes with each request
  (the server keeps no conversation); the worker fits it to the context window as `llmtrain
  chat` does and `start` says how many of the oldest messages it left out.
- POST /api/chat/{id}/stop: the worker stops that answer (only the annotator who asked may); a
  page that goes away (tab closed) stops its answer too.

The handlers are async and run on the event loop (they never touch the database); the models run
in the worker process (`modelserver`), so an answer never holds up the ranking pages.
Imports only the app's own modules, the stdlib and Starlette (never torch).
"""
from __future__ import annotations

import asyncio
import json
import math

from starlette.responses import JSONResponse, Response, StreamingResponse

from llmtrain.feedback.modelserver import END, Busy, ModelServer, WorkerDown
from llmtrain.feedback.pages import render
from llmtrain.feedback.web import RETRY_AFTER, endpoint, error, shown

FIELDS = ("model", "messages", "temperature", "top_p", "max_new_tokens")
DEFAULTS = {"temperature": 0.7, "top_p": 0.95, "max_new_tokens": 128}
MAX_NEW_TOKENS = 1024  # the most tokens one answer may ask for (the context window may allow fewer)
MAX_MESSAGES = 200
ROLES = ("user", "assistant")
PING = 15.0  # seconds between keep-alive comments while an answer waits


RANGES = {"temperature": (0, 2, "a number from 0 (greedy) to 2"),
          "top_p": (0, 1, "a number above 0 and at most 1"),
          "max_new_tokens": (1, MAX_NEW_TOKENS, f"a whole number from 1 to {MAX_NEW_TOKENS}")}


def number(data: dict, key: str):
    """data[key] (or its default) within its range (RANGES; top_p above 0); ValueError names it."""
    lo, hi, what = RANGES[key]
    v = data.get(key, DEFAULTS[key])
    whole = key == "max_new_tokens"
    typed = not isinstance(v, bool) and isinstance(v, int if whole else (int, float)) and (whole or math.isfinite(v))
    if not typed or not lo <= v <= hi or (key == "top_p" and v == 0):
        raise ValueError(f"{key} must be {what}, not {shown(json.dumps(v))}")
    return v


def chat_request(data: dict, models: list[str]) -> dict:
    """The checked request for the worker; ValueError with one line naming the field at fault."""
    unknown = [k for k in data if k not in FIELDS]
    if unknown:
        raise ValueError(f"unknown field {shown(unknown[0])} (the fields are {', '.join(FIELDS)})")
    model = data.get("model")
    if not isinstance(model, str) or model not in models:
        raise ValueError(f"model must be one of {', '.join(models)}" + (f", not {shown(model)}" if isinstance(model, str) else ""))
    msgs = data.get("messages")
    if not isinstance(msgs, list) or not 1 <= len(msgs) <= MAX_MESSAGES:
        raise ValueError(f"messages must be a list of 1 to {MAX_MESSAGES} messages, the last one the user's")
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or set(m) != {"role", "content"}:
            raise ValueError(f"messages[{i}] must be an object with exactly 'role' and 'content'")
        if m["role"] not in ROLES:
            raise ValueError(f"messages[{i}].role must be 'user' or 'assistant'")
        if not isinstance(m["content"], str):
            raise ValueError(f"messages[{i}].content must be a string")
    if msgs[-1]["role"] != "user":
        raise ValueError("the last message must be the user's (the model answers it)")
    return {"model": model, "messages": msgs,
            "temperature": float(number(data, "temperature")), "top_p": float(number(data, "top_p")),
            "max_new_tokens": number(data, "max_new_tokens")}


def sse(event: str, data: dict) -> bytes:
    """One server-sent event (JSON never holds a raw newline, so one data line)."""
    return f"event: {event}\ndata: {json.dumps(data)}\n\n".encode()


async def answer_events(server: ModelServer, job):
    """The answer's events as SSE, ending with its last one. If the page goes away first (Starlette
    cancels this generator when the client disconnects), the worker is told to stop."""
    ended = False
    try:
        yield sse("queued", {"id": job.id, "ahead": job.ahead})
        while True:
            try:
                ev = await asyncio.wait_for(job.events.get(), PING)
            except asyncio.TimeoutError:
                yield b": waiting\n\n"
                continue
            kind = ev.pop("event", "error")
            ev.pop("id", None)
            ended = kind in END
            yield sse(kind, ev)
            if ended:
                return
    finally:
        if not ended:
            server.stop(job.id, job.owner)


def model_server(request) -> ModelServer:
    return request.app.state.models


@endpoint(page=True)
def chat_page(gate, request, annotator, token, _=None) -> Response:
    server = model_server(request)
    return render(request, "chat.html", title="Chat", gate=gate, annotator=annotator, token=token,
                  scripts=["common.js", "chat.js"], active="chat", models=list(server.models), defaults=DEFAULTS,
                  max_new_tokens=MAX_NEW_TOKENS)


@endpoint(write=True, body="json")
async def api_chat(gate, request, annotator, token, data) -> Response:
    server = model_server(request)
    try:
        req = chat_request(data, list(server.models))
    except ValueError as e:
        return error(str(e), 400)
    try:
        job = await server.submit(annotator.id, req)
    except Busy:
        return error(f"the models are busy ({server.max_jobs} answers running or waiting); try again in a moment",
                     503, **{"Retry-After": RETRY_AFTER})
    except WorkerDown as e:
        return error(str(e), 503, **{"Retry-After": RETRY_AFTER})
    return StreamingResponse(answer_events(server, job), media_type="text/event-stream",
                             headers={"X-Accel-Buffering": "no"})


@endpoint(write=True)
async def api_chat_stop(gate, request, annotator, token, _=None) -> Response:
    job_id = request.path_params["job_id"]
    if not model_server(request).stop(job_id, annotator.id):
        return error(f"no answer {shown(job_id)} of yours is under way (it has ended, or it is not yours)", 404)
    return JSONResponse({"ok": True, "stopping": True})
