"""The HTML pages of the ranking app, rendered from Jinja2 templates (templates/, autoescape on:
model text and every other value is escaped by the template engine; the pages hold no inline
script, and static/rank.js and static/chat.js set model text only with textContent).

The page handlers are fn(gate, request, annotator, token, data) -> Response, marked with
`web.endpoint` and put behind authentication by `auth.Gate.wrap`.
Imports only the store, the API's views, the web helpers, the stdlib, Jinja2 and Starlette."""
from __future__ import annotations

import secrets
import time
from pathlib import Path

import jinja2
from starlette.requests import Request
from starlette.responses import Response
from starlette.templating import Jinja2Templates

from llmtrain.feedback.api import admin_data, mine_rows
from llmtrain.feedback.store import MAX_ID
from llmtrain.feedback.web import LOGIN_COOKIE, cookie_name, endpoint, parse_id, shown

TEMPLATES = Path(__file__).parent / "templates"
_env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True,
                          trim_blocks=True, lstrip_blocks=True, undefined=jinja2.StrictUndefined,
                          auto_reload=False)  # templates ship with the package: no stat per page
_env.filters["score"] = lambda x: "–" if x is None else f"{x:.3f}"
templates = Jinja2Templates(env=_env)

KEYS = [(["Tab", "↑", "↓"], "go from answer to answer"),
        (["Alt+↑", "Alt+↓"], "move the focused answer up or down (Shift works too)"),
        (["1", "–", "9"], "move the focused answer to that place"),
        (["T"], "tie the focused answer with the one above; again to untie"),
        (["Ctrl+Enter"], "submit the ranking")]


def render(request: Request, name: str, *, title: str, gate=None, annotator=None, token: str | None = None,
           status: int = 200, headers: dict | None = None, **context) -> Response:
    """The page `name` inside the layout (base.html): the nav and sign-out form for a signed-in
    annotator (with the chat page when the app serves models), the CSRF token in a meta tag
    when there is a session."""
    csrf = gate.csrf_for(token) if token else ""
    chat = getattr(request.app.state, "models", None) is not None
    arena = gate is not None and annotator is not None and (gate.arena_worker is not None or gate.store.has_arena())
    return templates.TemplateResponse(request, name, {"title": title, "annotator": annotator, "csrf": csrf,
                                                      "scripts": [], "active": "", "chat": chat, "arena_nav": arena,
                                                      **context},
                                      status_code=status, headers=headers)


def login_page(request: Request, error: str = "", nxt: str = "/", status: int = 200,
               headers: dict | None = None) -> Response:
    nonce = secrets.token_urlsafe(16)
    r = render(request, "login.html", title="Sign in", error=error, nonce=nonce, next=nxt, status=status,
               headers=headers)
    r.set_cookie(cookie_name(request, LOGIN_COOKIE), nonce, max_age=3600, httponly=True, samesite="strict",
                 path="/login", secure=request.url.scheme == "https")
    return r


def script_page(request: Request, gate, annotator, token, page: str, title: str, param: str, **context) -> Response:
    """A page that static/<page>.js fills in, opened at ?<param>=N (a prompt or match number)
    when given; any other value is a 400 page saying what it must be."""
    raw = request.query_params.get(param) or None
    if raw is not None and parse_id(raw) is None:
        return render(request, "message.html", title="Bad request", gate=gate, annotator=annotator, token=token,
                      status=400, heading="Bad request",
                      error=f"?{param}= must be a {param} number (1 to {MAX_ID}), not {shown(raw)}")
    return render(request, f"{page}.html", title=title, gate=gate, annotator=annotator, token=token,
                  scripts=["common.js", f"{page}.js"], active=page, **{param: parse_id(raw) if raw else None}, **context)


@endpoint(page=True)
def rank_page(gate, request, annotator, token, _=None) -> Response:
    """The ranking page; ?prompt=N changes the judgement of prompt N."""
    return script_page(request, gate, annotator, token, "rank", "Rank", "prompt", keys=KEYS)


@endpoint(page=True)
def arena_page(gate, request, annotator, token, _=None) -> Response:
    """The blind arena; ?match=N opens one match."""
    return script_page(request, gate, annotator, token, "arena", "Arena", "match", ask=gate.arena_worker is not None)


@endpoint(page=True)
def mine_page(gate, request, annotator, token, _=None) -> Response:
    rows = [dict(r, prompt=r["prompt"][:160], when=time.strftime("%Y-%m-%d %H:%M", time.localtime(r["created"])))
            for r in mine_rows(gate.store, annotator)]
    return render(request, "mine.html", title="My rankings", gate=gate, annotator=annotator, token=token,
                  active="mine", rows=rows)


@endpoint(page=True)
def admin_page(gate, request, annotator, token, _=None) -> Response:
    if not annotator.is_admin:
        return render(request, "message.html", title="Not allowed", gate=gate, annotator=annotator, token=token,
                      status=403, heading="Admins only", text="This page is for admins.")
    d = admin_data(gate.store)
    ids = d["round"]["open"]
    open_list = ", ".join(f"#{i}" for i in ids[:50]) + (" …" if len(ids) > 50 else "")
    return render(request, "admin.html", title="Admin", gate=gate, annotator=annotator, token=token, active="admin",
                  progress=d["progress"], pairs=d["agreement"]["pairs"], round=d["round"], open_list=open_list,
                  arena=d["arena"])
