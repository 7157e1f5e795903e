"""The ranking web app: annotators order K candidate answers per prompt (Starlette + uvicorn).

    llmtrain feedback serve --db feedback.db [--host 127.0.0.1] [--port 8000]
    python -m llmtrain.feedback.app --db feedback.db            (the same, without the CLI)

Security model
- Every page and every API call needs an annotator token (`llmtrain feedback add-annotator NAME`;
  the store keeps only its hash). The login page sets it as an HttpOnly, SameSite=Strict cookie;
  scripts send `Authorization: Bearer <token>` instead.
- A write made with the cookie must carry a CSRF token (header X-CSRF-Token, or form field
  `csrf`): an HMAC of the session token under a per-process secret, so a page from another site
  can neither read nor forge it. Bearer calls skip it (a browser never adds that header by itself).
  After a server restart the page fetches a fresh CSRF token from /api/session and retries.
- Everything is scoped to the signed-in annotator: no URL names another annotator, so their
  rankings are never returned; changing a judgement one has not made is a 404.
- Model text is only ever set with textContent (static/rank.js) or html.escape (pages here);
  a Content-Security-Policy without inline script backs that up.

DB work runs in Starlette's threadpool; the store opens one SQLite connection per thread.
This module imports only the store, agreement, the stdlib and Starlette: never torch.
"""
from __future__ import annotations

import argparse
import hashlib
import hmac
import html
import json
import random
import secrets
import string
import threading
import time
import urllib.parse
from pathlib import Path

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from llmtrain.feedback.agreement import summarize
from llmtrain.feedback.store import STATUSES, Annotator, FeedbackStore, StoreError

STATIC = Path(__file__).parent / "static"
COOKIE = "llmt_session"
LOGIN_COOKIE = "llmt_login"  # double-submit token of the login form (there is no session yet)
MAX_BODY = 64 * 1024
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


def display_order(annotator_id: int, prompt_id: int, k: int) -> list[int]:
    """The order an annotator sees a prompt's candidates in: shuffled, but the same on every
    reload (seeded by a hash of annotator and prompt), and different between annotators."""
    seed = int.from_bytes(hashlib.sha256(f"llmtrain-order:{annotator_id}:{prompt_id}".encode()).digest()[:8], "big")
    order = list(range(k))
    random.Random(seed).shuffle(order)
    return order


def create_app(db_path: str, secret: bytes | None = None) -> Starlette:
    """The ranking app over the feedback database at db_path. `secret` keys the CSRF tokens
    (default: random per process; pages fetch a fresh token after a restart)."""
    store = FeedbackStore(db_path)
    key = secret or secrets.token_bytes(32)
    # One writer at a time inside this process: threads queue on a Python lock (woken at once)
    # instead of racing for SQLite's write lock, whose busy handler sleeps for milliseconds.
    write_lock = threading.Lock()

    def submit(*args) -> bool:
        with write_lock:
            return store.submit(*args)

    def csrf_for(token: str) -> str:
        return hmac.new(key, b"csrf:" + token.encode(), hashlib.sha256).hexdigest()

    # ---- authentication

    def _token(request: Request) -> tuple[str | None, bool]:
        """(token, via_bearer)."""
        auth = request.headers.get("authorization", "")
        if auth[:7].lower() == "bearer ":
            return auth[7:].strip(), True
        return request.cookies.get(COOKIE), False

    def _refuse_unauthenticated(request: Request, page: bool) -> Response:
        if page:
            nxt = request.url.path + (f"?{request.url.query}" if request.url.query else "")
            r = RedirectResponse("/login?" + urllib.parse.urlencode({"next": nxt}), status_code=303)
            if request.cookies.get(COOKIE):
                r.delete_cookie(COOKIE, httponly=True, samesite="strict")
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
        return _same_origin(request) and bool(sent) and hmac.compare_digest(sent, csrf_for(token))

    CSRF_REFUSED = {"error": "missing or invalid CSRF token (reload the page)", "csrf": True}

    async def read_body(request: Request) -> bytes:
        if int(request.headers.get("content-length") or 0) > MAX_BODY:
            raise _Refused(JSONResponse({"error": "request body too large"}, status_code=413))
        chunks, n = [], 0
        async for chunk in request.stream():
            n += len(chunk)
            if n > MAX_BODY:
                raise _Refused(JSONResponse({"error": "request body too large"}, status_code=413))
            chunks.append(chunk)
        return b"".join(chunks)

    async def read_json(request: Request) -> dict:
        if "application/json" not in request.headers.get("content-type", ""):
            raise _Refused(JSONResponse({"error": "send JSON (Content-Type: application/json)"}, status_code=415))
        try:
            obj = json.loads(await read_body(request))
        except (ValueError, UnicodeDecodeError):
            raise _Refused(JSONResponse({"error": "the body is not valid JSON"}, status_code=400)) from None
        if not isinstance(obj, dict):
            raise _Refused(JSONResponse({"error": "the body must be a JSON object"}, status_code=400))
        return obj

    async def read_form(request: Request) -> dict:
        body = (await read_body(request)).decode("utf-8", "replace")
        return {k: v[0] for k, v in urllib.parse.parse_qs(body, keep_blank_values=True).items()}

    def endpoint(page: bool = False, write: bool = False, body: str | None = None):
        """Wrap a handler fn(request, annotator, token, data) -> Response that runs in the threadpool,
        token lookup included (one thread hop per request), behind authentication and CSRF checks.
        body: None, "json" or "form" (read here, capped at MAX_BODY)."""
        def wrap(fn):
            def run(request: Request, token: str, data) -> Response:
                annotator = store.annotator_by_token(token)
                if annotator is None:
                    return _refuse_unauthenticated(request, page)
                return fn(request, annotator, token, data)

            async def handler(request: Request) -> Response:
                token, bearer = _token(request)
                if not token:
                    return _refuse_unauthenticated(request, page)
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
                    # a refusal for a token that is not valid at all is a 401, not a 403 or 400
                    if await run_in_threadpool(store.annotator_by_token, token) is None:
                        return _refuse_unauthenticated(request, page)
                    return r.response
                return await run_in_threadpool(run, request, token, data)
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
        pid, status, ranking, sid = data.get("prompt_id"), data.get("status"), data.get("ranking"), data.get("submission_id")
        if isinstance(pid, bool) or not isinstance(pid, int):
            raise StoreError("prompt_id must be an integer")
        if status not in STATUSES:
            raise StoreError(f"status must be one of {', '.join(STATUSES)}")
        if status == "ranked" and not isinstance(ranking, list):
            raise StoreError("a ranked submission needs 'ranking': tiers of candidate indices, best first")
        if need_sid and (not isinstance(sid, str) or not 1 <= len(sid) <= 100):
            raise StoreError("submission_id must be a string of 1-100 characters (a client-made uuid)")
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

    def login_page(error: str = "", nxt: str = "/", status: int = 200) -> HTMLResponse:
        nonce = secrets.token_urlsafe(16)
        err = f'<p class="error" role="alert">{html.escape(error)}</p>' if error else ""
        body = (f'<section class="login card-plain"><h1>Sign in</h1>'
                f'<p>Paste the token you were given (it comes from <code>llmtrain feedback add-annotator NAME</code>).</p>{err}'
                f'<form method="post" action="/login"><input type="hidden" name="csrf" value="{nonce}">'
                f'<input type="hidden" name="next" value="{html.escape(nxt)}">'
                f'<label for="token">Annotator token</label>'
                f'<input id="token" name="token" type="password" autocomplete="current-password" required autofocus>'
                f'<button type="submit" class="primary">Sign in</button></form></section>')
        r = HTMLResponse(layout("Sign in", None, None, body), status_code=status)
        r.set_cookie(LOGIN_COOKIE, nonce, max_age=3600, httponly=True, samesite="strict", path="/login")
        return r

    def safe_next(nxt: str | None) -> str:
        return nxt if nxt and nxt.startswith("/") and not nxt.startswith("//") and "\\" not in nxt else "/"

    async def login_get(request: Request) -> Response:
        return login_page(nxt=safe_next(request.query_params.get("next")))

    async def login_post(request: Request) -> Response:
        try:
            form = await read_form(request)
        except _Refused as r:
            return r.response
        nxt = safe_next(form.get("next"))
        nonce = request.cookies.get(LOGIN_COOKIE, "")
        if not nonce or not hmac.compare_digest(nonce, form.get("csrf", "")) or not _same_origin(request):
            return login_page("The sign-in form expired; please try again.", nxt, status=403)
        token = form.get("token", "").strip()
        annotator = await run_in_threadpool(store.annotator_by_token, token) if token else None
        if annotator is None:
            return login_page("That token is not valid.", nxt, status=401)
        r = RedirectResponse(nxt, status_code=303)
        r.set_cookie(COOKIE, token, max_age=30 * 24 * 3600, httponly=True, samesite="strict",
                     secure=request.url.scheme == "https")
        r.delete_cookie(LOGIN_COOKIE, path="/login", httponly=True, samesite="strict")
        return r

    @endpoint(page=True, write=True, body="form")
    def logout(request, annotator, token, form) -> Response:
        r = RedirectResponse("/login", status_code=303)
        r.delete_cookie(COOKIE, httponly=True, samesite="strict")
        return r

    @endpoint(page=True)
    def rank_page(request, annotator, token, _=None) -> Response:
        edit = request.query_params.get("prompt", "")
        mode = f' data-prompt="{int(edit)}"' if edit.isdigit() else ""
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
        pid = request.path_params["prompt_id"]
        view = prompt_view(annotator, pid)
        if view is None:
            return JSONResponse({"error": f"no prompt with id {pid}"}, status_code=404)
        j = my_judgement(annotator, pid)
        mine = {k: j[k] for k in ("status", "ranking", "created")} if j else None
        return JSONResponse({"prompt": view, "judgement": mine, "progress": progress_of(annotator)})

    @endpoint()
    def api_mine(request, annotator, token, _=None) -> Response:
        return JSONResponse({"judgements": mine_rows(annotator)})

    @endpoint()
    def api_judgement(request, annotator, token, _=None) -> Response:
        pid = request.path_params["prompt_id"]
        j = my_judgement(annotator, pid)
        if j is None:
            return JSONResponse({"error": f"you have no judgement of prompt {pid}"}, status_code=404)
        return JSONResponse({k: j[k] for k in ("prompt_id", "status", "ranking", "created")})

    @endpoint(write=True, body="json")
    def api_submit(request, annotator, token, data) -> Response:
        try:
            pid, status, ranking, sid = validate(data, need_sid=True)
            recorded = submit(annotator, pid, status, ranking, sid)
        except StoreError as e:
            return JSONResponse({"error": str(e)}, status_code=400)
        return JSONResponse({"ok": True, "recorded": recorded, "duplicate": not recorded, "submission_id": sid})

    @endpoint(write=True, body="json")
    def api_change(request, annotator, token, data) -> Response:
        try:
            pid, status, ranking, _ = validate(data, need_sid=False)
            if my_judgement(annotator, pid) is None:  # only one's own: another's judgement is not there to change
                return JSONResponse({"error": f"you have no judgement of prompt {pid} to change"}, status_code=404)
            with write_lock:
                store.change(annotator, pid, status, ranking)
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
        Route("/api/prompt/{prompt_id:int}", api_prompt, methods=["GET"]),
        Route("/api/mine", api_mine, methods=["GET"]),
        Route("/api/judgement/{prompt_id:int}", api_judgement, methods=["GET"]),
        Route("/api/submit", api_submit, methods=["POST"]),
        Route("/api/change", api_change, methods=["POST"]),
        Route("/api/admin", api_admin, methods=["GET"]),
        Route("/admin/close", admin_close, methods=["POST"]),
        Route("/api/admin/close", api_admin_close, methods=["POST"]),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    app = Starlette(routes=routes)
    app.add_middleware(_SecurityHeaders)
    app.state.store = store
    return app


def serve(db_path: str, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Run the app under uvicorn (one worker process; DB work in its threadpool) until stopped."""
    import uvicorn

    app = create_app(db_path)
    print(f"llmtrain feedback: serving {db_path} on http://{host}:{port}/ (Ctrl+C stops)", flush=True)
    uvicorn.run(app, host=host, port=port, workers=1, log_level=log_level,
                access_log=log_level in ("debug", "trace"), timeout_graceful_shutdown=5)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="the llmtrain ranking web app")
    ap.add_argument("--db", default="feedback.db")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--log-level", default="info")
    a = ap.parse_args(argv)
    serve(a.db, a.host, a.port, a.log_level)


if __name__ == "__main__":
    main()
