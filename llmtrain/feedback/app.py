"""The ranking web app: annotators order K candidate answers per prompt (Starlette + uvicorn).

    llmtrain feedback serve --db feedback.db [--host 127.0.0.1] [--port 8000]
    python -m llmtrain.feedback.app --db feedback.db            (the same, without the CLI)
    llmtrain feedback serve --db feedback.db --model sft=runs/sft [--model NAME=CKPT ...]   (and /chat)

Security model (docs/feedback-app.md says what holds on http and on https)
- Every page and every API call needs an annotator: a browser signs in once with the annotator's
  token (`llmtrain feedback add-annotator NAME`; the store keeps only its hash) and gets a
  server-side session: a random session id whose hash is stored with an expiry. The cookie
  (HttpOnly, SameSite=Strict, Path=/, named after the port: `llmtrain_session_<port>`, on https
  `__Host-llmtrain_session_<port>` and Secure) holds only that id, never the token. Logging out
  deletes the session; `feedback revoke-annotator` and `feedback rotate-token` end all of an
  annotator's sessions. Scripts send `Authorization: Bearer <token>` instead.
- Failed token checks (sign-in form, Bearer) are throttled per client address and overall: 429
  with Retry-After. Tokens and session ids are 256-bit random, so the throttle is against noise,
  not guessing, and never locks out a valid credential: the token is checked first (a hash
  lookup) and a valid one always succeeds; only failed checks are counted, only failed checks get
  429, and a success does not clear an address's count.
- A request body must arrive within BODY_TIMEOUT seconds (else 408; other requests go on).
- Once an admin has closed the round, /api/submit, /api/change and /api/arena/vote answer 409
  and write nothing.
- The arena (/arena, arena_api.py) is blind: no page or API answer names the models of a match
  before the signed-in annotator has voted on it; the sides are drawn per annotator.
- A write made with the cookie must carry a CSRF token (header X-CSRF-Token, or form field
  `csrf`): an HMAC of the session id under a per-process secret, so a page from another site
  can neither read nor forge it. Bearer calls skip it (a browser never adds that header by itself).
  After a server restart the page fetches a fresh CSRF token from /api/session and retries.
- Who is asking is settled before a request body is read; bodies are capped, JSON depth is
  capped, and every malformed input is a 4xx with a one-line reason (never a traceback). A
  database locked by another program makes writes answer 503 with Retry-After after a short
  wait, while reads go on (WAL; writes queue on one lock and take at most a few threads).
- Everything is scoped to the signed-in annotator: no URL names another annotator, so their
  rankings are never returned; changing a judgement one has not made is a 404.
- Model text is only ever set with textContent (static/rank.js, static/chat.js) or escaped by the
  Jinja2 templates (autoescape on, pages.py); a Content-Security-Policy without inline script backs
  that up.
- With `--model NAME=CKPT` the app also serves a chat page (chatapi.py): the models run in a
  worker process of their own (modelworker.py, started by modelserver.py), never in this one, so
  an answer being generated never holds up the ranking pages; at most a few answers run or wait
  at once (503 with Retry-After beyond), and only the annotator who asked may stop an answer.

The parts: web.py (limits, security headers, error answers, request bodies), auth.py (sessions,
CSRF, throttle, cookies, sign-in; the write lock), pages.py + templates/ (HTML), api.py (JSON),
chatapi.py + modelserver.py (the chat page and its model worker), arena_api.py (the arena's JSON;
its figures in arena_stats.py);
this module assembles them (routes, middleware, error handlers) and serves the app.
DB work runs in Starlette's threadpool; the store opens one SQLite connection per thread.
The app imports only the store, agreement, arena_stats, llmtrain.errors, the stdlib, Jinja2 and Starlette: never torch.
"""
from __future__ import annotations

import argparse
import errno
import secrets
import socket
import sys
from pathlib import Path

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from llmtrain.errors import ConfigError
from llmtrain.feedback import api, arena_api, chatapi, pages
from llmtrain.feedback.auth import Gate, Throttle, logout
from llmtrain.feedback.modelserver import MAX_JOBS, ModelServer, ServedArenaWorker, parse_models
from llmtrain.feedback.store import FeedbackStore
from llmtrain.feedback.web import (BODY_TIMEOUT, BUSY_TIMEOUT, FAILED_LOGINS, SECURITY_HEADERS, SESSION_TTL,
                                   SecurityHeaders, display_order, error, parse_id, shown)

__all__ = ["create_app", "serve", "bind", "display_order", "parse_id", "main"]

STATIC = Path(__file__).parent / "static"


def create_app(db_path: str, secret: bytes | None = None, busy_timeout: float = BUSY_TIMEOUT,
               session_ttl: float = SESSION_TTL, failed_logins: tuple[int, int, float] = FAILED_LOGINS,
               body_timeout: float = BODY_TIMEOUT, models: ModelServer | None = None,
               arena_worker: arena_api.ArenaWorker | None = None) -> Starlette:
    """The ranking app over the feedback database at db_path. `secret` keys the CSRF tokens
    (default: random per process; pages fetch a fresh token after a restart). busy_timeout:
    seconds a write waits for the database before answering 503. failed_logins: (per client
    address, overall, window in seconds) of failed token checks before 429. body_timeout:
    seconds a request body may take to arrive before 408. models: a started ModelServer, for
    the chat page (None: no chat page, no /api/chat). arena_worker: what answers a person's own
    arena prompt live (arena_api.ArenaWorker; default: the chat's models, through `models`;
    None without them: /api/arena/ask answers 501)."""
    store = FeedbackStore(db_path, busy_timeout=busy_timeout)
    gate = Gate(store, secret or secrets.token_bytes(32), Throttle(*failed_logins), busy_timeout, session_ttl,
                body_timeout)
    gate.arena_worker = arena_worker or (ServedArenaWorker(models) if models is not None else None)
    w = gate.wrap
    routes = [
        Route("/login", gate.login_get, methods=["GET"]),
        Route("/login", gate.login_post, methods=["POST"]),
        Route("/logout", w(logout), methods=["POST"]),
        Route("/", w(pages.rank_page), methods=["GET"]),
        Route("/mine", w(pages.mine_page), methods=["GET"]),
        Route("/admin", w(pages.admin_page), methods=["GET"]),
        Route("/arena", w(pages.arena_page), methods=["GET"]),
        Route("/api/session", w(api.api_session), methods=["GET"]),
        Route("/api/next", w(api.api_next), methods=["GET"]),
        Route("/api/progress", w(api.api_progress), methods=["GET"]),
        Route("/api/prompt/{prompt_id}", w(api.api_prompt), methods=["GET"]),
        Route("/api/mine", w(api.api_mine), methods=["GET"]),
        Route("/api/judgement/{prompt_id}", w(api.api_judgement), methods=["GET"]),
        Route("/api/submit", w(api.api_submit), methods=["POST"]),
        Route("/api/change", w(api.api_change), methods=["POST"]),
        Route("/api/admin", w(api.api_admin), methods=["GET"]),
        Route("/api/arena/next", w(arena_api.api_arena_next), methods=["GET"]),
        Route("/api/arena/match/{match_id}", w(arena_api.api_arena_match), methods=["GET"]),
        Route("/api/arena/vote", w(arena_api.api_arena_vote), methods=["POST"]),
        Route("/api/arena/ask", w(arena_api.api_arena_ask), methods=["POST"]),
        Route("/admin/close", w(api.admin_close), methods=["POST"]),
        Route("/api/admin/close", w(api.api_admin_close), methods=["POST"]),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    if models is not None:
        routes[-1:-1] = [
            Route("/chat", w(chatapi.chat_page), methods=["GET"]),
            Route("/api/chat", w(chatapi.api_chat), methods=["POST"]),
            Route("/api/chat/{job_id}/stop", w(chatapi.api_chat_stop), methods=["POST"]),
        ]
    app = Starlette(routes=routes, exception_handlers={HTTPException: http_error, Exception: server_error})
    app.add_middleware(SecurityHeaders)
    app.state.store = store
    app.state.models = models
    return app


async def http_error(request: Request, exc: HTTPException) -> Response:
    """Starlette's own refusals (no such route, wrong method): one line, JSON under /api/."""
    what = {404: "no such page", 405: f"{request.method} is not allowed here"}.get(exc.status_code, exc.detail)
    msg = f"{what}: {shown(request.url.path, 80)}"
    headers = dict(exc.headers or {})
    if request.url.path.startswith("/api/"):
        return error(msg, exc.status_code, **headers)
    return PlainTextResponse(msg, status_code=exc.status_code, headers=headers)


async def server_error(request: Request, exc: Exception) -> Response:
    """A bug: 500 with the security headers (this answer is made outside the middleware; the
    server still logs the traceback, which is what a bug needs)."""
    r = error("internal error (the server log has the details)", 500)
    for k, v in SECURITY_HEADERS:
        r.headers[k.decode()] = v.decode()
    r.headers["cache-control"] = "no-store"
    return r


def bind(host: str, port: int, port_flag: str = "--port", host_flag: str = "--host") -> socket.socket:
    """The listening socket, bound before uvicorn starts: a busy port (or a host that is not
    this machine's) is a ConfigError naming the flag, never uvicorn's lines or a wait."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                          flags=socket.AI_PASSIVE)[0]
    except (socket.gaierror, UnicodeError) as e:
        raise ConfigError(f"{host_flag} {host}: not an address of this machine ({e})") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does (not a listening port)
        sock.bind(addr)
    except OSError as e:
        sock.close()
        why = {errno.EADDRINUSE: "is already in use (another server listens on it; pick another port, or 0 for any free one)",
               errno.EACCES: "needs privileges to bind (ports below 1024); pick a port from 1024 up",
               errno.EADDRNOTAVAIL: f"cannot be bound on {host} (not an address of this machine)"}.get(
                   e.errno, f"cannot be bound on {host} ({e.strerror or e})")
        raise ConfigError(f"{port_flag} {port}: port {port} {why}") from None
    return sock


def serve(db_path: str, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info",
          models: dict[str, str] | None = None, chat_jobs: int = MAX_JOBS) -> None:
    """Run the app under uvicorn (one worker process; DB work in its threadpool) until stopped.
    The port is bound first, then the chat models (if any: {name: checkpoint}) are loaded in
    their worker process: a busy port or a checkpoint that does not load is a ConfigError naming
    --port or --model before anything is served or written."""
    import uvicorn

    sock = bind(host, port)
    server = None
    try:
        if models:
            print(f"llmtrain feedback: loading {len(models)} chat model(s) in a worker process ...", flush=True)
            server = ModelServer(models, chat_jobs).start()
        app = create_app(db_path, models=server)
        shown = sock.getsockname()[1]
        print(f"llmtrain feedback: serving {db_path} on http://{host}:{shown}/ (Ctrl+C stops)", flush=True)
        if server is not None:
            print(f"llmtrain feedback: chat with {', '.join(models)} at http://{host}:{shown}/chat", flush=True)
        uv = uvicorn.Server(uvicorn.Config(app, workers=1, log_level=log_level,
                                           access_log=log_level in ("debug", "trace"), timeout_graceful_shutdown=5))
        uv.run(sockets=[sock])
    finally:
        if server is not None:
            server.close()
        sock.close()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="the llmtrain ranking web app")
    ap.add_argument("--db", default="feedback.db")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--log-level", default="info")
    ap.add_argument("--model", action="append", default=[], metavar="NAME=CKPT", help="serve a chat page with this model")
    ap.add_argument("--chat-jobs", type=int, default=MAX_JOBS, help="chat answers running or waiting at once")
    a = ap.parse_args(argv)
    try:
        serve(a.db, a.host, a.port, a.log_level, parse_models(a.model), a.chat_jobs)
    except ConfigError as e:
        print(f"llmtrain.feedback.app: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
