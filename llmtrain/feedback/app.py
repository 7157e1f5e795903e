"""The ranking web app: annotators order K candidate answers per prompt (Starlette + uvicorn).

    llmtrain feedback serve --db feedback.db [--host 127.0.0.1] [--port 8000]
    python -m llmtrain.feedback.app --db feedback.db            (the same, without the CLI)

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
- Once an admin has closed the round, /api/submit and /api/change answer 409 and write nothing.
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
- Model text is only ever set with textContent (static/rank.js) or html.escape (pages here);
  a Content-Security-Policy without inline script backs that up.

DB work runs in Starlette's threadpool; the store opens one SQLite connection per thread.
This module imports only the store, agreement, llmtrain.errors, the stdlib and Starlette: never torch.
"""
from __future__ import annotations

import argparse
import asyncio
import errno
import hashlib
import hmac
import html
import json
import random
import re
import secrets
import socket
import sqlite3
import sys
import string
import threading
import time
import urllib.parse
from collections import deque
from pathlib import Path

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from llmtrain.errors import ConfigError
from llmtrain.feedback.agreement import summarize
from llmtrain.feedback.store import MAX_ID, STATUSES, Annotator, FeedbackStore, StoreBusy, StoreError, is_busy

STATIC = Path(__file__).parent / "static"
COOKIE = "llmtrain_session"  # + "_<port>" (cookies are not port-isolated; see cookie_name)
LOGIN_COOKIE = "llmtrain_login"  # + "_<port>": double-submit token of the login form (there is no session yet)
SESSION_TTL = 12 * 3600  # seconds a session lives (absolute; sign in again after)
BUSY_TIMEOUT = 2.0  # seconds a write waits for the database before 503
RETRY_AFTER = "2"
MAX_WRITERS = 16  # writes waiting or running at once (of the 40 threads); the rest answer 503 at once
FAILED_LOGINS = (10, 100, 300)  # failed token checks per client address, overall, within this many seconds
MAX_BODY = 64 * 1024
BODY_TIMEOUT = 5.0  # seconds a request body may take to arrive (a slow body is cut off with 408)
MAX_DEPTH = 8  # JSON nesting a request body may have (a submission needs 3)
SUBMIT_FIELDS = ("prompt_id", "status", "ranking", "submission_id")
_DIGITS = re.compile(r"[0-9]{1,19}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
LABELS = string.ascii_uppercase

CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
       "object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'")
SECURITY_HEADERS = [
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"same-origin"),
]


class _SecurityHeaders:
    """Adds the CSP and friends to every response (pure ASGI: no per-request task overhead)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                have = {k.lower() for k, _ in message.get("headers", [])}
                extra = [(k, v) for k, v in SECURITY_HEADERS if k not in have]
                if not scope["path"].startswith("/static/"):
                    extra.append((b"cache-control", b"no-store"))
                message["headers"] = list(message.get("headers", [])) + extra
            await send(message)

        await self.app(scope, receive, send_with_headers)


class _Refused(Exception):
    def __init__(self, response: Response):
        self.response = response


def _error(message: str, status: int, **headers) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers or None)


def _busy() -> JSONResponse:
    return _error("the database is busy (another program is writing to it); try again in a moment", 503,
                  **{"Retry-After": RETRY_AFTER})


def _shown(s: str, n: int = 40) -> str:
    """A client's string as a message may quote it: ASCII only, at most n characters."""
    s = ascii(s)[1:-1]
    return s if len(s) <= n else s[:n] + "..."


def parse_id(s: str | None) -> int | None:
    """A prompt id as sent in a URL: ASCII digits only, at most 2**63-1 (else None)."""
    if not s or not _DIGITS.fullmatch(s):
        return None
    n = int(s)
    return n if 1 <= n <= MAX_ID else None


def same_secret(a: str, b: str) -> bool:
    """Constant-time comparison of two strings of any characters (hmac refuses non-ASCII str)."""
    return hmac.compare_digest(a.encode("utf-8", "surrogatepass"), b.encode("utf-8", "surrogatepass"))


def cookie_name(request: Request, base: str = COOKIE) -> str:
    """`<base>_<port>`: browsers send a host's cookies to every port of it, so two apps (or two
    llmtrain servers) on one host must not share a name; on https `__Host-<base>_<port>`, which
    a browser accepts only with Secure, Path=/ and no Domain (no http page can set it)."""
    server = request.scope.get("server") or (None, None)
    port = server[1] if len(server) > 1 and server[1] else (request.url.port or 0)
    prefix = "__Host-" if request.url.scheme == "https" and base == COOKIE else ""
    return f"{prefix}{base}_{port}"


class _Throttle:
    """Failed token checks within a window, per client address and overall.

    Only failures are recorded and only a failed check is ever refused (429): a valid token or
    session is checked first and always succeeds, so noise from anyone cannot lock a real user
    out, and a success does not clear the address's count (no interleaving valid and invalid
    tokens to escape the limit)."""

    SWEEP = 10.0  # seconds between sweeps of addresses whose failures have all expired

    def __init__(self, per_address: int, overall: int, window: float):
        self.per_address, self.overall, self.window = per_address, overall, window
        self.by_address: dict[str, deque] = {}
        self.all: deque = deque(maxlen=overall)  # only the newest `overall` times decide
        self.lock = threading.Lock()
        self.swept = time.monotonic()

    def failed(self, addr: str) -> int:
        """Record one failed check from addr. -> 0 (answer 401), or the seconds to wait (answer
        429) when this address, or everyone together, had already failed that often within
        the window."""
        now = time.monotonic()
        cut = now - self.window
        with self.lock:
            if now - self.swept > self.SWEEP:
                self.swept = now
                for a in [a for a, q in self.by_address.items() if not q or q[-1] < cut]:
                    del self.by_address[a]
            q = self.by_address.setdefault(addr, deque(maxlen=self.per_address))
            while q and q[0] < cut:
                q.popleft()
            while self.all and self.all[0] < cut:
                self.all.popleft()
            over = len(q) >= self.per_address or len(self.all) >= self.overall
            q.append(now)
            self.all.append(now)
            if not over:
                return 0
            waits = [w[0] + self.window - now for w, n in ((q, self.per_address), (self.all, self.overall))
                     if len(w) >= n]
            return max(1, int(max(waits)) + 1)


def display_order(annotator_id: int, prompt_id: int, k: int) -> list[int]:
    """The order an annotator sees a prompt's candidates in: shuffled, but the same on every
    reload (seeded by a hash of annotator and prompt), and different between annotators."""
    seed = int.from_bytes(hashlib.sha256(f"llmtrain-order:{annotator_id}:{prompt_id}".encode()).digest()[:8], "big")
    order = list(range(k))
    random.Random(seed).shuffle(order)
    return order


def create_app(db_path: str, secret: bytes | None = None, busy_timeout: float = BUSY_TIMEOUT,
               session_ttl: float = SESSION_TTL, failed_logins: tuple[int, int, float] = FAILED_LOGINS,
               body_timeout: float = BODY_TIMEOUT) -> Starlette:
    """The ranking app over the feedback database at db_path. `secret` keys the CSRF tokens
    (default: random per process; pages fetch a fresh token after a restart). busy_timeout:
    seconds a write waits for the database before answering 503. failed_logins: (per client
    address, overall, window in seconds) of failed token checks before 429. body_timeout:
    seconds a request body may take to arrive before 408."""
    store = FeedbackStore(db_path, busy_timeout=busy_timeout)
    key = secret or secrets.token_bytes(32)
    throttle = _Throttle(*failed_logins)
    # One writer at a time inside this process: threads queue on a Python lock (woken at once)
    # instead of racing for SQLite's write lock, whose busy handler sleeps for milliseconds.
    # A write waits at most busy_timeout for it, and at most MAX_WRITERS wait at all, so writes
    # stuck behind another program's lock never take the threads that reads need.
    write_lock = threading.RLock()
    writers = [0]
    writers_lock = threading.Lock()

    def submit(*args) -> bool:
        with write_lock:
            return store.submit(*args)

    def run_write(fn, *args) -> Response:
        """fn(*args) under the write lock, in this worker thread; 503 when the database is busy."""
        if not write_lock.acquire(timeout=busy_timeout):
            return _busy()
        try:
            return fn(*args)
        except StoreBusy:
            return _busy()
        except sqlite3.OperationalError as e:
            if is_busy(e):
                return _busy()
            raise
        finally:
            write_lock.release()

    async def write_in_thread(fn, *args) -> Response:
        with writers_lock:
            if writers[0] >= MAX_WRITERS:
                return _busy()
            writers[0] += 1
        try:
            return await run_in_threadpool(run_write, fn, *args)
        finally:
            with writers_lock:
                writers[0] -= 1

    def csrf_for(token: str) -> str:
        return hmac.new(key, b"csrf:" + token.encode("utf-8", "surrogatepass"), hashlib.sha256).hexdigest()

    # ---- authentication

    def _token(request: Request) -> tuple[str | None, bool]:
        """(session id or token, via_bearer)."""
        auth = request.headers.get("authorization", "")
        if auth[:7].lower() == "bearer ":
            return auth[7:].strip(), True
        return request.cookies.get(cookie_name(request)), False

    def authenticate(token: str, bearer: bool) -> Annotator | None:
        return store.annotator_by_token(token) if bearer else store.session_annotator(token)

    def client_address(request: Request) -> str:
        return request.client.host if request.client else "?"

    def too_many(request: Request, wait: int, page: bool) -> Response:
        msg = f"too many failed sign-ins; try again in {wait} s"
        if page:
            return login_page(request, msg[0].upper() + msg[1:] + ".", status=429, headers={"Retry-After": str(wait)})
        return _error(msg, 429, **{"Retry-After": str(wait)})

    def _set_session_cookie(request: Request, r: Response, sid: str) -> None:
        r.set_cookie(cookie_name(request), sid, max_age=max(1, int(session_ttl)), path="/", httponly=True, samesite="strict",
                     secure=request.url.scheme == "https")

    def _delete_session_cookie(request: Request, r: Response) -> None:
        r.delete_cookie(cookie_name(request), path="/", httponly=True, samesite="strict",
                        secure=request.url.scheme == "https")

    def _refuse_unauthenticated(request: Request, page: bool) -> Response:
        if page:
            nxt = request.url.path + (f"?{request.url.query}" if request.url.query else "")
            r = RedirectResponse("/login?" + urllib.parse.urlencode({"next": nxt}), status_code=303)
            if request.cookies.get(cookie_name(request)):
                _delete_session_cookie(request, r)
            return r
        return JSONResponse({"error": "a valid annotator token is required (log in, or send Authorization: Bearer <token>)"},
                            status_code=401, headers={"WWW-Authenticate": "Bearer"})

    def _same_origin(request: Request) -> bool:
        """A browser names the page's origin on a cross-site POST; refuse any but our own."""
        origin = request.headers.get("origin")
        if origin is None:
            return True
        host = request.headers.get("host", "")
        return origin in (f"http://{host}", f"https://{host}")

    def _csrf_ok(request: Request, token: str, form: dict | None = None) -> bool:
        sent = request.headers.get("x-csrf-token") or (form or {}).get("csrf", "")
        return _same_origin(request) and bool(sent) and same_secret(sent, csrf_for(token))

    CSRF_REFUSED = {"error": "missing or invalid CSRF token (reload the page)", "csrf": True}

    async def read_body(request: Request) -> bytes:
        length = request.headers.get("content-length") or "0"
        if not length.isascii() or not length.isdigit():
            raise _Refused(_error("the Content-Length header is not a number", 400))
        if len(length) > 12 or int(length) > MAX_BODY:
            raise _Refused(_error(f"request body too large (at most {MAX_BODY} bytes)", 413))
        chunks = []

        async def receive_all() -> None:
            n = 0
            async for chunk in request.stream():
                n += len(chunk)
                if n > MAX_BODY:
                    raise _Refused(_error(f"request body too large (at most {MAX_BODY} bytes)", 413))
                chunks.append(chunk)
        try:  # a body trickling in is cut off (this coroutine waits; other requests go on)
            await asyncio.wait_for(receive_all(), timeout=body_timeout)
        except ClientDisconnect:  # the client went away mid-body: nothing to answer, nothing to log
            raise _Refused(_error("the client disconnected", 400)) from None
        except asyncio.TimeoutError:
            raise _Refused(_error(f"the request body did not arrive within {body_timeout:g} s", 408,
                                  Connection="close")) from None
        return b"".join(chunks)

    def check_json(obj, where: str = "", depth: int = 0) -> None:
        """No lone surrogates (SQLite cannot store them) and at most MAX_DEPTH levels."""
        if depth > MAX_DEPTH:
            raise _Refused(_error(f"the JSON body is nested too deeply (more than {MAX_DEPTH} levels)", 400))
        if isinstance(obj, str):
            try:
                obj.encode("utf-8")
            except UnicodeEncodeError:
                raise _Refused(_error(f"{where or 'the body'} is not valid Unicode text (a lone surrogate)", 400)) from None
        elif isinstance(obj, dict):
            for k, v in obj.items():
                check_json(k, f"the field name {_shown(k)}", depth + 1)
                check_json(v, where or _shown(k), depth + 1)
        elif isinstance(obj, list):
            for v in obj:
                check_json(v, where, depth + 1)

    async def read_json(request: Request) -> dict:
        if "application/json" not in request.headers.get("content-type", ""):
            raise _Refused(_error("send JSON (Content-Type: application/json)", 415))
        raw = await read_body(request)
        try:
            obj = json.loads(raw)
        except RecursionError:
            raise _Refused(_error(f"the JSON body is nested too deeply (more than {MAX_DEPTH} levels)", 400)) from None
        except UnicodeDecodeError:
            raise _Refused(_error("the body is not valid UTF-8", 400)) from None
        except ValueError as e:
            why = "a number in it has too many digits" if "digits" in str(e) else str(e).split(":")[0]
            raise _Refused(_error(f"the body is not valid JSON ({why})", 400)) from None
        if not isinstance(obj, dict):
            raise _Refused(_error("the body must be a JSON object", 400))
        check_json(obj)
        return obj

    async def read_form(request: Request) -> dict:
        body = (await read_body(request)).decode("utf-8", "replace")
        return {k: v[0] for k, v in urllib.parse.parse_qs(body, keep_blank_values=True).items()}

    def endpoint(page: bool = False, write: bool = False, body: str | None = None):
        """Wrap a handler fn(request, annotator, token, data) -> Response that runs in the threadpool,
        behind authentication and CSRF checks; `token` is the session id (cookie) or the Bearer token.
        A read authenticates and runs fn in one thread hop; a request with a body is authenticated
        before its body is read, and a write runs under the write lock (503 when the database is busy).
        body: None, "json" or "form" (read here, capped at MAX_BODY)."""
        def wrap(fn):
            def run(request: Request, token: str, bearer: bool) -> tuple[bool, Response]:
                """A read: authentication and fn in one thread hop. -> (authenticated, response)."""
                annotator = authenticate(token, bearer)
                if annotator is None:
                    return False, _refuse_unauthenticated(request, page)
                return True, fn(request, annotator, token, None)

            async def handler(request: Request) -> Response:
                token, bearer = _token(request)
                if not token:
                    return _refuse_unauthenticated(request, page)
                addr = client_address(request)
                try:  # the credential is checked first: a valid one is never throttled
                    if body is None and not write:
                        ok, response = await run_in_threadpool(run, request, token, bearer)
                    else:  # who is asking is settled before the body is read
                        annotator = await run_in_threadpool(authenticate, token, bearer)
                        ok = annotator is not None
                        response = None if ok else _refuse_unauthenticated(request, page)
                except sqlite3.OperationalError as e:
                    if is_busy(e):
                        return _busy()
                    raise
                if not ok:
                    if bearer and (wait := throttle.failed(addr)):
                        return too_many(request, wait, page)
                    return response
                if response is not None:
                    return response
                try:
                    data = None
                    if write and not bearer and body != "form" and not _csrf_ok(request, token):
                        raise _Refused(JSONResponse(CSRF_REFUSED, status_code=403))  # before reading the body
                    if body == "json":
                        data = await read_json(request)
                    elif body == "form":
                        data = await read_form(request)
                        if write and not bearer and not _csrf_ok(request, token, data):
                            raise _Refused(JSONResponse(CSRF_REFUSED, status_code=403))
                except _Refused as r:
                    return r.response
                if write:
                    return await write_in_thread(fn, request, annotator, token, data)
                return await run_in_threadpool(fn, request, annotator, token, data)
            handler.__name__ = fn.__name__
            return handler
        return wrap

    # ---- data helpers (run in the threadpool)

    def prompt_view(annotator: Annotator, prompt_id: int) -> dict | None:
        p = store.prompt(prompt_id)
        if p is None:
            return None
        order = display_order(annotator.id, p["id"], len(p["candidates"]))
        msgs = p["messages"]
        context = msgs[:-1] if msgs and msgs[-1].get("role") == "user" else msgs
        text = msgs[-1]["content"] if msgs and msgs[-1].get("role") == "user" else p["prompt"]
        n, of = store.round_of(p["id"])
        return {"id": p["id"], "prompt": text, "context": [{"role": m["role"], "content": m["content"]} for m in context],
                "candidates": [dict(p["candidates"][i], label=LABELS[pos]) for pos, i in enumerate(order)],
                "round": {"n": n, "of": of}}

    def progress_of(annotator: Annotator) -> dict:
        c = store.status_counts(annotator)
        return {"done": sum(c[s] for s in STATUSES), **c}

    def my_judgement(annotator: Annotator, prompt_id: int) -> dict | None:
        return next((j for j in store.judgements(annotator) if j["prompt_id"] == prompt_id), None)

    def next_view(annotator: Annotator) -> dict:
        closed = store.round_closed()  # an admin closed the round: nothing more is asked
        pid = None if closed else store.next_prompt(annotator)
        return {"prompt": prompt_view(annotator, pid) if pid is not None else None, "progress": progress_of(annotator),
                "closed": closed}

    def validate(data: dict, need_sid: bool) -> tuple[int, str, list | None, str]:
        unknown = [k for k in data if k not in SUBMIT_FIELDS]
        if unknown:
            raise StoreError(f"unknown field {_shown(unknown[0])} (the fields are {', '.join(SUBMIT_FIELDS)})")
        pid, status, ranking, sid = data.get("prompt_id"), data.get("status"), data.get("ranking"), data.get("submission_id")
        if isinstance(pid, bool) or not isinstance(pid, int):
            raise StoreError("prompt_id must be an integer")
        if not 1 <= pid <= MAX_ID:
            raise StoreError(f"prompt_id must be an integer from 1 to {MAX_ID}")
        if not isinstance(status, str):
            raise StoreError(f"status must be a string, one of {', '.join(STATUSES)}")
        if status not in STATUSES:
            raise StoreError(f"status must be one of {', '.join(STATUSES)}")
        if status == "ranked" and not isinstance(ranking, list):
            raise StoreError("a ranked submission needs 'ranking': tiers of candidate indices, best first")
        if status != "ranked" and ranking is not None:  # never silently dropped
            raise StoreError(f"ranking must be left out (or null) when status is {status}: only a ranked submission has one")
        if need_sid and (not isinstance(sid, str) or not 1 <= len(sid) <= 100):
            raise StoreError("submission_id must be a string of 1-100 characters (a client-made uuid)")
        if need_sid and (bad := _CONTROL.search(sid)):
            raise StoreError(f"submission_id must not contain control characters (it has {_shown(bad.group())})")
        return pid, status, ranking if status == "ranked" else None, sid

    # ---- pages

    def layout(title: str, annotator: Annotator | None, token: str | None, body: str, scripts=(), active: str = "") -> str:
        nav = ""
        if annotator is not None:
            links = [("/", "Rank", "rank"), ("/mine", "My rankings", "mine")]
            if annotator.is_admin:
                links.append(("/admin", "Admin", "admin"))
            items = "".join(f'<a href="{u}"{" aria-current=page" if a == active else ""}>{t}</a>' for u, t, a in links)
            nav = (f'<nav aria-label="Main">{items}</nav><div class="who"><span>{html.escape(annotator.name)}</span>'
                   f'<form method="post" action="/logout"><input type="hidden" name="csrf" value="{csrf_for(token)}">'
                   f'<button type="submit" class="link">Log out</button></form></div>')
        meta = f'<meta name="csrf-token" content="{csrf_for(token)}">' if token else ""
        js = "".join(f'<script src="/static/{s}" defer></script>' for s in scripts)
        return (f'<!doctype html><html lang="en"><head><meta charset="utf-8">'
                f'<meta name="viewport" content="width=device-width, initial-scale=1">{meta}'
                f'<title>{html.escape(title)} · llmtrain feedback</title>'
                f'<link rel="icon" href="/static/favicon.svg"><link rel="stylesheet" href="/static/app.css">{js}</head><body>'
                f'<header class="top"><div class="brand">llmtrain <span>feedback</span></div>{nav}</header>'
                f'<main>{body}</main></body></html>')

    def login_page(request: Request, error: str = "", nxt: str = "/", status: int = 200,
                   headers: dict | None = None) -> HTMLResponse:
        nonce = secrets.token_urlsafe(16)
        err = f'<p class="error" role="alert">{html.escape(error)}</p>' if error else ""
        body = (f'<section class="login card-plain"><h1>Sign in</h1>'
                f'<p>Paste the token you were given (it comes from <code>llmtrain feedback add-annotator NAME</code>).</p>{err}'
                f'<form method="post" action="/login"><input type="hidden" name="csrf" value="{nonce}">'
                f'<input type="hidden" name="next" value="{html.escape(nxt)}">'
                f'<label for="token">Annotator token</label>'
                f'<input id="token" name="token" type="password" autocomplete="current-password" required autofocus>'
                f'<button type="submit" class="primary">Sign in</button></form></section>')
        r = HTMLResponse(layout("Sign in", None, None, body), status_code=status, headers=headers)
        r.set_cookie(cookie_name(request, LOGIN_COOKIE), nonce, max_age=3600, httponly=True, samesite="strict",
                     path="/login", secure=request.url.scheme == "https")
        return r

    def safe_next(nxt: str | None) -> str:
        return nxt if nxt and nxt.startswith("/") and not nxt.startswith("//") and "\\" not in nxt else "/"

    async def login_get(request: Request) -> Response:
        return login_page(request, nxt=safe_next(request.query_params.get("next")))

    async def login_post(request: Request) -> Response:
        login_cookie = cookie_name(request, LOGIN_COOKIE)
        addr = client_address(request)
        try:
            form = await read_form(request)
        except _Refused as r:
            return r.response
        nxt = safe_next(form.get("next"))
        nonce = request.cookies.get(login_cookie, "")
        if not nonce or not same_secret(nonce, form.get("csrf", "")) or not _same_origin(request):
            return login_page(request, "The sign-in form expired; please try again.", nxt, status=403)
        token = form.get("token", "").strip()
        try:
            annotator = await run_in_threadpool(store.annotator_by_token, token) if token else None
        except sqlite3.OperationalError as e:
            if is_busy(e):
                return _busy()
            raise
        if annotator is None:  # only a failed check counts, and only it may be refused
            if wait := throttle.failed(addr):
                return too_many(request, wait, page=True)
            return login_page(request, "That token is not valid.", nxt, status=401)
        old = request.cookies.get(cookie_name(request))

        def new_session() -> Response:
            if old:  # whatever session this browser had (perhaps one planted on it) ends here
                store.revoke_session(old)
            sid = store.create_session(annotator, session_ttl)
            r = RedirectResponse(nxt, status_code=303)
            _set_session_cookie(request, r, sid)
            r.delete_cookie(login_cookie, path="/login", httponly=True, samesite="strict")
            return r
        r = await write_in_thread(new_session)
        if r.status_code == 503:
            return login_page(request, "The database is busy; please sign in again in a moment.", nxt, status=503,
                              headers={"Retry-After": RETRY_AFTER})
        return r

    @endpoint(page=True, write=True, body="form")
    def logout(request, annotator, token, form) -> Response:
        store.revoke_session(token)  # the session ends on the server, not only in this browser
        r = RedirectResponse("/login", status_code=303)
        _delete_session_cookie(request, r)
        return r

    @endpoint(page=True)
    def rank_page(request, annotator, token, _=None) -> Response:
        edit = request.query_params.get("prompt") or None
        if edit is not None and parse_id(edit) is None:
            return HTMLResponse(layout("Bad request", annotator, token,
                                       f'<h1>Bad request</h1><p class="error" role="alert">?prompt= must be a prompt number '
                                       f'(1 to {MAX_ID}), not {html.escape(_shown(edit))}</p>'), status_code=400)
        mode = f' data-prompt="{parse_id(edit)}"' if edit is not None else ""
        keys = [(["Tab", "↑", "↓"], "go from answer to answer"),
                (["Alt+↑", "Alt+↓"], "move the focused answer up or down (Shift works too)"),
                (["1", "–", "9"], "move the focused answer to that place"),
                (["T"], "tie the focused answer with the one above; again to untie"),
                (["Ctrl+Enter"], "submit the ranking")]

        def kbd(combo: str) -> str:
            return combo if combo == "–" else "+".join(f"<kbd>{html.escape(k)}</kbd>" for k in combo.split("+"))
        keys_html = "".join(f"<div><dt>{' '.join(kbd(c) for c in combos)}</dt><dd>{html.escape(v)}</dd></div>"
                            for combos, v in keys)
        body = f"""
<div id="rank"{mode}>
  <div class="progress-row"><span id="progress" aria-live="polite">Loading…</span>
    <div class="bar" aria-hidden="true"><div id="bar-fill"></div></div></div>
  <section class="prompt" aria-labelledby="prompt-h">
    <h1 id="prompt-h">Prompt <span id="prompt-id" class="muted"></span> <span id="prompt-round" class="round" hidden></span></h1>
    <p id="round-note" class="round-note" hidden></p>
    <div id="context" class="context"></div>
    <div id="prompt-text" class="text prompt-text"></div>
  </section>
  <p class="hint" id="hint">Put the answers in order, <strong>best at the top</strong>: drag them, or use the keyboard.
    Mark two answers as equally good with <em>= tie</em>.</p>
  <ol id="cands" class="cands" aria-describedby="hint"></ol>
  <div class="actions">
    <button type="button" id="submit" class="primary">Submit ranking</button>
    <button type="button" id="allbad" class="warn">All unacceptable</button>
    <button type="button" id="skip">Skip</button>
    <a id="cancel" href="/mine" hidden>Cancel</a>
    <span id="status" role="status" aria-live="polite"></span>
  </div>
  <section id="done" class="card-plain" hidden><h2>All done</h2>
    <p>You have judged every prompt. Thank you! You can revise your judgements under <a href="/mine">My rankings</a>.</p></section>
  <section id="closed" class="card-plain" hidden><h2>This round is closed</h2>
    <p>An admin has closed the round: the rankings made so far go on to training. Thank you!</p></section>
  <aside class="keys" aria-label="Keyboard shortcuts"><h2>Keyboard</h2><dl>{keys_html}</dl></aside>
</div>"""
        return HTMLResponse(layout("Rank", annotator, token, body, scripts=["rank.js"], active="rank"))

    def mine_rows(annotator: Annotator) -> list[dict]:
        rows = []
        for j in store.judgements(annotator):
            p = store.prompt(j["prompt_id"])
            order = display_order(annotator.id, p["id"], len(p["candidates"]))
            label = {i: LABELS[pos] for pos, i in enumerate(order)}
            if j["status"] == "ranked":
                summary = " > ".join(" = ".join(label[i] for i in tier) for tier in j["ranking"])
            else:
                summary = {"all_bad": "all unacceptable", "skipped": "skipped"}[j["status"]]
            rows.append({"prompt_id": p["id"], "prompt": p["prompt"], "status": j["status"], "summary": summary,
                         "created": j["created"]})
        return rows

    @endpoint(page=True)
    def mine_page(request, annotator, token, _=None) -> Response:
        rows = mine_rows(annotator)
        if rows:
            trs = "".join(
                f'<tr><td class="num">{r["prompt_id"]}</td><td class="clip">{html.escape(r["prompt"][:160])}</td>'
                f'<td><span class="tag {r["status"]}">{html.escape(r["status"].replace("_", " "))}</span></td>'
                f'<td class="mono">{html.escape(r["summary"])}</td>'
                f'<td class="muted">{time.strftime("%Y-%m-%d %H:%M", time.localtime(r["created"]))}</td>'
                f'<td><a href="/?prompt={r["prompt_id"]}">Change</a></td></tr>' for r in rows)
            table = (f'<table class="grid"><thead><tr><th>#</th><th>Prompt</th><th>Status</th><th>Your order (best first)</th>'
                     f'<th>When</th><th></th></tr></thead><tbody>{trs}</tbody></table>')
        else:
            table = '<p class="muted">Nothing yet. <a href="/">Start ranking</a>.</p>'
        body = f'<h1>My rankings</h1><p class="muted">{len(rows)} judgements. Letters are the answers as you saw them.</p>{table}'
        return HTMLResponse(layout("My rankings", annotator, token, body, active="mine"))

    def admin_data() -> dict:
        judgements = store.judgements()
        total = len(store.prompt_ids())
        per = {a.name: {"annotator": a.name, "is_admin": a.is_admin, "simulated": a.simulated, "total": total,
                        **dict.fromkeys(STATUSES, 0)} for a in store.annotators()}
        for j in judgements:
            per[j["annotator"]][j["status"]] += 1
        for p in per.values():
            p["done"] = sum(p[s] for s in STATUSES)
        open_ids = store.open_prompts()
        return {"progress": list(per.values()), "agreement": summarize(judgements),
                "round": {"closed": store.round_closed(), "prompts": total, "open": open_ids}}

    def fmt(x) -> str:
        return "–" if x is None else f"{x:.3f}"

    @endpoint(page=True)
    def admin_page(request, annotator, token, _=None) -> Response:
        if not annotator.is_admin:
            return HTMLResponse(layout("Not allowed", annotator, token, "<h1>Admins only</h1><p>This page is for admins.</p>"),
                                status_code=403)
        d = admin_data()
        prog = "".join(
            f'<tr><td>{html.escape(p["annotator"])}{" <span class=tag>admin</span>" if p["is_admin"] else ""}'
            f'{" <span class=tag>simulated</span>" if p["simulated"] else ""}</td>'
            f'<td class="num">{p["done"]} / {p["total"]}</td><td class="num">{p["ranked"]}</td>'
            f'<td class="num">{p["all_bad"]}</td><td class="num">{p["skipped"]}</td></tr>' for p in d["progress"])
        agr = "".join(
            f'<tr><td>{html.escape(a["a"])}</td><td>{html.escape(a["b"])}</td><td class="num">{a["shared_prompts"]}</td>'
            f'<td class="num">{fmt(a["pairwise_agreement"])}</td><td class="num">{fmt(a["kendall_tau"])}</td></tr>'
            for a in d["agreement"]["pairs"]) or '<tr><td colspan="5" class="muted">No prompt ranked by two annotators yet.</td></tr>'
        rnd = d["round"]
        if rnd["closed"]:
            state = '<p id="round-state"><strong>The round is closed.</strong> The pipeline goes on with what people ranked.</p>'
        else:
            ids = rnd["open"]
            still = (f'<strong>{len(ids)} of {rnd["prompts"]} prompts still open</strong> (no one has ranked, skipped or '
                     f'marked them yet): ' + ", ".join(f"#{i}" for i in ids[:50]) + (" …" if len(ids) > 50 else "")
                     if ids else f'Every one of the {rnd["prompts"]} prompts has been judged.')
            state = (f'<p id="round-state">{still}</p><form method="post" action="/admin/close" class="close-round">'
                     f'<input type="hidden" name="csrf" value="{csrf_for(token)}"><button type="submit" class="warn" '
                     f'id="close-round">Close the round</button> <span class="muted">The pipeline then goes on with the '
                     f'prompts people have ranked; the open ones are left out.</span></form>')
        body = (f'<h1>Admin</h1><h2>Round</h2>{state}<h2>Progress</h2><table class="grid" id="progress-table"><thead><tr><th>Annotator</th>'
                f'<th>Done</th><th>Ranked</th><th>All unacceptable</th><th>Skipped</th></tr></thead><tbody>{prog}</tbody></table>'
                f'<h2>Agreement on shared prompts</h2><p class="muted">Pairwise agreement: share of candidate pairs both '
                f'ordered strictly that they ordered the same way. Kendall τ-b: mean over shared prompts (−1 … 1).</p>'
                f'<table class="grid" id="agreement-table"><thead><tr><th>Annotator</th><th>Annotator</th><th>Shared prompts</th>'
                f'<th>Pairwise agreement</th><th>Kendall τ</th></tr></thead><tbody>{agr}</tbody></table>')
        return HTMLResponse(layout("Admin", annotator, token, body, active="admin"))

    # ---- JSON API

    @endpoint()
    def api_session(request, annotator, token, _=None) -> Response:
        return JSONResponse({"annotator": annotator.name, "is_admin": annotator.is_admin, "csrf": csrf_for(token)})

    @endpoint()
    def api_next(request, annotator, token, _=None) -> Response:
        return JSONResponse(next_view(annotator))

    @endpoint()
    def api_progress(request, annotator, token, _=None) -> Response:
        return JSONResponse(progress_of(annotator))

    @endpoint()
    def api_prompt(request, annotator, token, _=None) -> Response:
        pid = parse_id(request.path_params["prompt_id"])
        view = prompt_view(annotator, pid) if pid is not None else None
        if view is None:
            return _error(f"no prompt with id {_shown(request.path_params['prompt_id'])} "
                          f"(prompt ids are whole numbers from 1 to {MAX_ID})", 404)
        j = my_judgement(annotator, pid)
        mine = {k: j[k] for k in ("status", "ranking", "created")} if j else None
        return JSONResponse({"prompt": view, "judgement": mine, "progress": progress_of(annotator),
                             "closed": store.round_closed()})

    @endpoint()
    def api_mine(request, annotator, token, _=None) -> Response:
        return JSONResponse({"judgements": mine_rows(annotator)})

    @endpoint()
    def api_judgement(request, annotator, token, _=None) -> Response:
        pid = parse_id(request.path_params["prompt_id"])
        j = my_judgement(annotator, pid) if pid is not None else None
        if j is None:
            return _error(f"you have no judgement of prompt {_shown(request.path_params['prompt_id'])}", 404)
        return JSONResponse({k: j[k] for k in ("prompt_id", "status", "ranking", "created")})

    def round_is_closed() -> Response:
        return JSONResponse({"error": "the round is closed (an admin closed it; nothing more is recorded)",
                             "closed": True}, status_code=409)

    @endpoint(write=True, body="json")
    def api_submit(request, annotator, token, data) -> Response:
        try:
            pid, status, ranking, sid = validate(data, need_sid=True)
            if store.round_closed():  # under the write lock: closing and submitting do not interleave
                return round_is_closed()
            recorded = submit(annotator, pid, status, ranking, sid)
        except StoreBusy:
            raise  # 503 (run_write)
        except StoreError as e:
            return JSONResponse({"error": str(e)}, status_code=400)
        return JSONResponse({"ok": True, "recorded": recorded, "duplicate": not recorded, "submission_id": sid})

    @endpoint(write=True, body="json")
    def api_change(request, annotator, token, data) -> Response:
        try:
            pid, status, ranking, _ = validate(data, need_sid=False)
            if store.round_closed():
                return round_is_closed()
            if my_judgement(annotator, pid) is None:  # only one's own: another's judgement is not there to change
                return JSONResponse({"error": f"you have no judgement of prompt {pid} to change"}, status_code=404)
            with write_lock:
                store.change(annotator, pid, status, ranking)
        except StoreBusy:
            raise  # 503 (run_write)
        except StoreError as e:
            return JSONResponse({"error": str(e)}, status_code=400)
        return JSONResponse({"ok": True})

    @endpoint()
    def api_admin(request, annotator, token, _=None) -> Response:
        if not annotator.is_admin:
            return JSONResponse({"error": "admins only"}, status_code=403)
        return JSONResponse(admin_data())

    def close_round(annotator: Annotator) -> Response | None:
        if not annotator.is_admin:
            return JSONResponse({"error": "admins only"}, status_code=403)
        with write_lock:
            store.close_round()
        return None

    @endpoint(page=True, write=True, body="form")
    def admin_close(request, annotator, token, form) -> Response:
        return close_round(annotator) or RedirectResponse("/admin", status_code=303)

    @endpoint(write=True)
    def api_admin_close(request, annotator, token, _=None) -> Response:
        return close_round(annotator) or JSONResponse({"ok": True, "closed": True})

    routes = [
        Route("/login", login_get, methods=["GET"]),
        Route("/login", login_post, methods=["POST"]),
        Route("/logout", logout, methods=["POST"]),
        Route("/", rank_page, methods=["GET"]),
        Route("/mine", mine_page, methods=["GET"]),
        Route("/admin", admin_page, methods=["GET"]),
        Route("/api/session", api_session, methods=["GET"]),
        Route("/api/next", api_next, methods=["GET"]),
        Route("/api/progress", api_progress, methods=["GET"]),
        Route("/api/prompt/{prompt_id}", api_prompt, methods=["GET"]),
        Route("/api/mine", api_mine, methods=["GET"]),
        Route("/api/judgement/{prompt_id}", api_judgement, methods=["GET"]),
        Route("/api/submit", api_submit, methods=["POST"]),
        Route("/api/change", api_change, methods=["POST"]),
        Route("/api/admin", api_admin, methods=["GET"]),
        Route("/admin/close", admin_close, methods=["POST"]),
        Route("/api/admin/close", api_admin_close, methods=["POST"]),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    app = Starlette(routes=routes, exception_handlers={HTTPException: http_error, Exception: server_error})
    app.add_middleware(_SecurityHeaders)
    app.state.store = store
    return app


async def http_error(request: Request, exc: HTTPException) -> Response:
    """Starlette's own refusals (no such route, wrong method): one line, JSON under /api/."""
    what = {404: "no such page", 405: f"{request.method} is not allowed here"}.get(exc.status_code, exc.detail)
    msg = f"{what}: {_shown(request.url.path, 80)}"
    headers = dict(exc.headers or {})
    if request.url.path.startswith("/api/"):
        return _error(msg, exc.status_code, **headers)
    return PlainTextResponse(msg, status_code=exc.status_code, headers=headers)


async def server_error(request: Request, exc: Exception) -> Response:
    """A bug: 500 with the security headers (this answer is made outside the middleware; the
    server still logs the traceback, which is what a bug needs)."""
    r = _error("internal error (the server log has the details)", 500)
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


def serve(db_path: str, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Run the app under uvicorn (one worker process; DB work in its threadpool) until stopped.
    The port is bound first: a busy one is a ConfigError naming --port before anything starts."""
    import uvicorn

    sock = bind(host, port)
    try:
        app = create_app(db_path)
        shown = sock.getsockname()[1]
        print(f"llmtrain feedback: serving {db_path} on http://{host}:{shown}/ (Ctrl+C stops)", flush=True)
        server = uvicorn.Server(uvicorn.Config(app, workers=1, log_level=log_level,
                                               access_log=log_level in ("debug", "trace"), timeout_graceful_shutdown=5))
        server.run(sockets=[sock])
    finally:
        sock.close()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="the llmtrain ranking web app")
    ap.add_argument("--db", default="feedback.db")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--log-level", default="info")
    a = ap.parse_args(argv)
    try:
        serve(a.db, a.host, a.port, a.log_level)
    except ConfigError as e:
        print(f"llmtrain.feedback.app: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
