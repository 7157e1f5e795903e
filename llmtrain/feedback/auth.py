"""Sessions and auth of the ranking app: who is asking (session cookie or Bearer token), CSRF
tokens, the throttle on failed token checks, the session cookies, sign-in and sign-out, and the
one-writer-at-a-time lock every write goes through. `Gate` holds that state for one app;
`Gate.wrap` puts a handler marked with `web.endpoint` behind it.

Imports only the store, the app's pages and web helpers, the stdlib and Starlette (never torch)."""
from __future__ import annotations

import functools
import hashlib
import hmac
import inspect
import sqlite3
import threading
import time
import urllib.parse
from collections import deque

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response

from llmtrain.feedback.pages import login_page
from llmtrain.feedback.store import Annotator, FeedbackStore, StoreBusy, is_busy
from llmtrain.feedback.web import (COOKIE, LOGIN_COOKIE, MAX_WRITERS, RETRY_AFTER, Refused, busy, cookie_name, endpoint,
                                   error, read_form, read_json, same_secret)

CSRF_REFUSED = {"error": "missing or invalid CSRF token (reload the page)", "csrf": True}


class Throttle:
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


def client_address(request: Request) -> str:
    return request.client.host if request.client else "?"


def request_token(request: Request) -> tuple[str | None, bool]:
    """(session id or token, via_bearer)."""
    auth = request.headers.get("authorization", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip(), True
    return request.cookies.get(cookie_name(request)), False


def same_origin(request: Request) -> bool:
    """A browser names the page's origin on a cross-site POST; refuse any but our own."""
    origin = request.headers.get("origin")
    if origin is None:
        return True
    host = request.headers.get("host", "")
    return origin in (f"http://{host}", f"https://{host}")


def safe_next(nxt: str | None) -> str:
    return nxt if nxt and nxt.startswith("/") and not nxt.startswith("//") and "\\" not in nxt else "/"


def delete_session_cookie(request: Request, r: Response) -> None:
    r.delete_cookie(cookie_name(request), path="/", httponly=True, samesite="strict",
                    secure=request.url.scheme == "https")


class Gate:
    """The auth state of one app: the store, the CSRF key, the throttle, the write lock."""

    def __init__(self, store: FeedbackStore, key: bytes, throttle: Throttle, busy_timeout: float,
                 session_ttl: float, body_timeout: float):
        self.store, self.key, self.throttle = store, key, throttle
        self.busy_timeout, self.session_ttl, self.body_timeout = busy_timeout, session_ttl, body_timeout
        # One writer at a time inside this process: threads queue on a Python lock (woken at once)
        # instead of racing for SQLite's write lock, whose busy handler sleeps for milliseconds.
        # A write waits at most busy_timeout for it, and at most MAX_WRITERS wait at all, so writes
        # stuck behind another program's lock never take the threads that reads need.
        self.write_lock = threading.RLock()
        self.arena_worker = None  # answers a person's own arena prompt (arena_api.ArenaWorker); none yet
        self.writers = 0
        self.writers_lock = threading.Lock()

    # ---- writes

    def run_write(self, fn, *args) -> Response:
        """fn(*args) under the write lock, in this worker thread; 503 when the database is busy."""
        if not self.write_lock.acquire(timeout=self.busy_timeout):
            return busy()
        try:
            return fn(*args)
        except StoreBusy:
            return busy()
        except sqlite3.OperationalError as e:
            if is_busy(e):
                return busy()
            raise
        finally:
            self.write_lock.release()

    async def write_in_thread(self, fn, *args) -> Response:
        with self.writers_lock:
            if self.writers >= MAX_WRITERS:
                return busy()
            self.writers += 1
        try:
            return await run_in_threadpool(self.run_write, fn, *args)
        finally:
            with self.writers_lock:
                self.writers -= 1

    # ---- who is asking

    def csrf_for(self, token: str) -> str:
        return hmac.new(self.key, b"csrf:" + token.encode("utf-8", "surrogatepass"), hashlib.sha256).hexdigest()

    def csrf_ok(self, request: Request, token: str, form: dict | None = None) -> bool:
        sent = request.headers.get("x-csrf-token") or (form or {}).get("csrf", "")
        return same_origin(request) and bool(sent) and same_secret(sent, self.csrf_for(token))

    def authenticate(self, token: str, bearer: bool) -> Annotator | None:
        return self.store.annotator_by_token(token) if bearer else self.store.session_annotator(token)

    def too_many(self, request: Request, wait: int, page: bool) -> Response:
        msg = f"too many failed sign-ins; try again in {wait} s"
        if page:
            return login_page(request, msg[0].upper() + msg[1:] + ".", status=429, headers={"Retry-After": str(wait)})
        return error(msg, 429, **{"Retry-After": str(wait)})

    def refuse_unauthenticated(self, request: Request, page: bool) -> Response:
        if page:
            nxt = request.url.path + (f"?{request.url.query}" if request.url.query else "")
            r = RedirectResponse("/login?" + urllib.parse.urlencode({"next": nxt}), status_code=303)
            if request.cookies.get(cookie_name(request)):
                delete_session_cookie(request, r)
            return r
        return JSONResponse({"error": "a valid annotator token is required (log in, or send Authorization: Bearer <token>)"},
                            status_code=401, headers={"WWW-Authenticate": "Bearer"})

    # ---- handlers behind authentication

    def wrap(self, fn):
        """The Starlette handler of fn(gate, request, annotator, token, data) -> Response, marked by
        `web.endpoint`, which runs in the threadpool; `token` is the session id (cookie) or the
        Bearer token. A read authenticates and runs fn in one thread hop; a request with a body is
        authenticated before its body is read, and a write runs under the write lock. An async fn
        (the chat) runs on the event loop instead, never touches the database and takes no write
        lock; it is authenticated, and CSRF-checked when marked so, as any other."""
        page, write, body, csrf = (fn.endpoint[k] for k in ("page", "write", "body", "csrf"))
        on_loop = inspect.iscoroutinefunction(fn)
        call = functools.partial(fn, self)

        def run(request: Request, token: str, bearer: bool) -> tuple[bool, Response]:
            """A read: authentication and fn in one thread hop. -> (authenticated, response)."""
            annotator = self.authenticate(token, bearer)
            if annotator is None:
                return False, self.refuse_unauthenticated(request, page)
            return True, call(request, annotator, token, None)

        async def handler(request: Request) -> Response:
            token, bearer = request_token(request)
            if not token:
                return self.refuse_unauthenticated(request, page)
            addr = client_address(request)
            try:  # the credential is checked first: a valid one is never throttled
                if body is None and not write and not csrf and not on_loop:
                    ok, response = await run_in_threadpool(run, request, token, bearer)
                else:  # who is asking is settled before the body is read
                    annotator = await run_in_threadpool(self.authenticate, token, bearer)
                    ok = annotator is not None
                    response = None if ok else self.refuse_unauthenticated(request, page)
            except sqlite3.OperationalError as e:
                if is_busy(e):
                    return busy()
                raise
            if not ok:
                if bearer and (wait := self.throttle.failed(addr)):
                    return self.too_many(request, wait, page)
                return response
            if response is not None:
                return response
            try:
                data = await self.checked_body(request, token, bearer, csrf, body)
            except Refused as r:
                return r.response
            if on_loop:
                return await call(request, annotator, token, data)
            if write:
                return await self.write_in_thread(call, request, annotator, token, data)
            return await run_in_threadpool(call, request, annotator, token, data)
        handler.__name__ = fn.__name__
        return handler

    async def checked_body(self, request: Request, token: str, bearer: bool, csrf: bool, body: str | None):
        """The request's body (None, JSON or form) once the CSRF token of a cookie write (`csrf`) is
        right (checked before reading the body where it comes in a header). Raises Refused."""
        data = None
        if csrf and not bearer and body != "form" and not self.csrf_ok(request, token):
            raise Refused(JSONResponse(CSRF_REFUSED, status_code=403))  # before reading the body
        if body == "json":
            data = await read_json(request, self.body_timeout)
        elif body == "form":
            data = await read_form(request, self.body_timeout)
            if csrf and not bearer and not self.csrf_ok(request, token, data):
                raise Refused(JSONResponse(CSRF_REFUSED, status_code=403))
        return data

    # ---- sign-in and sign-out

    async def login_get(self, request: Request) -> Response:
        return login_page(request, nxt=safe_next(request.query_params.get("next")))

    async def login_post(self, request: Request) -> Response:
        login_cookie = cookie_name(request, LOGIN_COOKIE)
        addr = client_address(request)
        try:
            form = await read_form(request, self.body_timeout)
        except Refused as r:
            return r.response
        nxt = safe_next(form.get("next"))
        nonce = request.cookies.get(login_cookie, "")
        if not nonce or not same_secret(nonce, form.get("csrf", "")) or not same_origin(request):
            return login_page(request, "The sign-in form expired; please try again.", nxt, status=403)
        token = form.get("token", "").strip()
        try:
            annotator = await run_in_threadpool(self.store.annotator_by_token, token) if token else None
        except sqlite3.OperationalError as e:
            if is_busy(e):
                return busy()
            raise
        if annotator is None:  # only a failed check counts, and only it may be refused
            if wait := self.throttle.failed(addr):
                return self.too_many(request, wait, page=True)
            return login_page(request, "That token is not valid.", nxt, status=401)
        r = await self.write_in_thread(self.new_session, request, annotator, nxt)
        if r.status_code == 503:
            return login_page(request, "The database is busy; please sign in again in a moment.", nxt, status=503,
                              headers={"Retry-After": RETRY_AFTER})
        return r

    def new_session(self, request: Request, annotator: Annotator, nxt: str) -> Response:
        """A fresh session for a valid sign-in: the redirect to `nxt` that sets its cookie."""
        old = request.cookies.get(cookie_name(request))
        if old:  # whatever session this browser had (perhaps one planted on it) ends here
            self.store.revoke_session(old)
        sid = self.store.create_session(annotator, self.session_ttl)
        r = RedirectResponse(nxt, status_code=303)
        r.set_cookie(cookie_name(request, COOKIE), sid, max_age=max(1, int(self.session_ttl)), path="/", httponly=True,
                     samesite="strict", secure=request.url.scheme == "https")
        r.delete_cookie(cookie_name(request, LOGIN_COOKIE), path="/login", httponly=True, samesite="strict")
        return r



@endpoint(page=True, write=True, body="form")
def logout(gate: Gate, request: Request, annotator: Annotator, token: str, form: dict) -> Response:
    gate.store.revoke_session(token)  # the session ends on the server, not only in this browser
    r = RedirectResponse("/login", status_code=303)
    delete_session_cookie(request, r)
    return r
