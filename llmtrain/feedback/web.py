"""What every part of the ranking app shares: limits, the security headers, one-line error
answers, cookie names, parsing of ids, and reading request bodies within their caps.

Imports only the store, the stdlib and Starlette (never torch)."""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import random
import re
import string
import urllib.parse

from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response

from llmtrain.feedback.store import MAX_ID

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
_DIGITS = re.compile(r"[0-9]{1,19}")
LABELS = string.ascii_uppercase

CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
       "object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'")
SECURITY_HEADERS = [
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"same-origin"),
]


class SecurityHeaders:
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


class Refused(Exception):
    """Raised while reading a request: the answer to send instead of going on."""

    def __init__(self, response: Response):
        self.response = response


def error(message: str, status: int, **headers) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers or None)


def busy() -> JSONResponse:
    return error("the database is busy (another program is writing to it); try again in a moment", 503,
                 **{"Retry-After": RETRY_AFTER})


def shown(s: str, n: int = 40) -> str:
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


def display_order(annotator_id: int, prompt_id: int, k: int) -> list[int]:
    """The order an annotator sees a prompt's candidates in: shuffled, but the same on every
    reload (seeded by a hash of annotator and prompt), and different between annotators."""
    seed = int.from_bytes(hashlib.sha256(f"llmtrain-order:{annotator_id}:{prompt_id}".encode()).digest()[:8], "big")
    order = list(range(k))
    random.Random(seed).shuffle(order)
    return order


def endpoint(page: bool = False, write: bool = False, body: str | None = None, csrf: bool | None = None):
    """Marks a handler fn(gate, request, annotator, token, data) -> Response for `Gate.wrap`
    (llmtrain.feedback.auth), which puts it behind authentication and CSRF checks.
    page: an HTML page (unauthenticated -> redirect to /login, not 401). write: runs under the
    write lock (503 when the database is busy). body: None, "json" or "form". csrf: a cookie
    request must carry the CSRF token (default: when `write`; a handler that writes only part of
    the time, taking the write lock itself, says csrf=True)."""
    def mark(fn):
        fn.endpoint = {"page": page, "write": write, "body": body, "csrf": write if csrf is None else csrf}
        return fn
    return mark


# ---- request bodies

async def read_body(request: Request, timeout: float) -> bytes:
    """The body, at most MAX_BODY bytes, arrived within `timeout` seconds (else Refused)."""
    length = request.headers.get("content-length") or "0"
    if not length.isascii() or not length.isdigit():
        raise Refused(error("the Content-Length header is not a number", 400))
    if len(length) > 12 or int(length) > MAX_BODY:
        raise Refused(error(f"request body too large (at most {MAX_BODY} bytes)", 413))
    chunks = []

    async def receive_all() -> None:
        n = 0
        async for chunk in request.stream():
            n += len(chunk)
            if n > MAX_BODY:
                raise Refused(error(f"request body too large (at most {MAX_BODY} bytes)", 413))
            chunks.append(chunk)
    try:  # a body trickling in is cut off (this coroutine waits; other requests go on)
        await asyncio.wait_for(receive_all(), timeout=timeout)
    except ClientDisconnect:  # the client went away mid-body: nothing to answer, nothing to log
        raise Refused(error("the client disconnected", 400)) from None
    except asyncio.TimeoutError:
        raise Refused(error(f"the request body did not arrive within {timeout:g} s", 408,
                            Connection="close")) from None
    return b"".join(chunks)


def check_json(obj, where: str = "", depth: int = 0) -> None:
    """No lone surrogates (SQLite cannot store them) and at most MAX_DEPTH levels."""
    if depth > MAX_DEPTH:
        raise Refused(error(f"the JSON body is nested too deeply (more than {MAX_DEPTH} levels)", 400))
    if isinstance(obj, str):
        try:
            obj.encode("utf-8")
        except UnicodeEncodeError:
            raise Refused(error(f"{where or 'the body'} is not valid Unicode text (a lone surrogate)", 400)) from None
    elif isinstance(obj, dict):
        for k, v in obj.items():
            check_json(k, f"the field name {shown(k)}", depth + 1)
            check_json(v, where or shown(k), depth + 1)
    elif isinstance(obj, list):
        for v in obj:
            check_json(v, where, depth + 1)


async def read_json(request: Request, timeout: float) -> dict:
    if "application/json" not in request.headers.get("content-type", ""):
        raise Refused(error("send JSON (Content-Type: application/json)", 415))
    raw = await read_body(request, timeout)
    try:
        obj = json.loads(raw)
    except RecursionError:
        raise Refused(error(f"the JSON body is nested too deeply (more than {MAX_DEPTH} levels)", 400)) from None
    except UnicodeDecodeError:
        raise Refused(error("the body is not valid UTF-8", 400)) from None
    except ValueError as e:
        why = "a number in it has too many digits" if "digits" in str(e) else str(e).split(":")[0]
        raise Refused(error(f"the body is not valid JSON ({why})", 400)) from None
    if not isinstance(obj, dict):
        raise Refused(error("the body must be a JSON object", 400))
    check_json(obj)
    return obj


async def read_form(request: Request, timeout: float) -> dict:
    body = (await read_body(request, timeout)).decode("utf-8", "replace")
    return {k: v[0] for k, v in urllib.parse.parse_qs(body, keep_blank_values=True).items()}
