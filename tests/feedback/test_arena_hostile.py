"""Hostile input to the arena's API (/api/arena/*, /arena) against the real server under uvicorn:
bad ids, wrong vote values, a vote naming another prompt, another person's own prompt, missing
or wrong CSRF tokens, bodies that are not JSON. Each case must get the expected 4xx with a
one-line reason naming the thing, the security headers, no traceback in the server log, and
leave the database exactly as it was. (The closed round: test_arena_app.py.)"""
from __future__ import annotations

import html
import re
import sqlite3
import time

import httpx
import pytest

from llmtrain.feedback.store import FeedbackStore

from webapp_helpers import LiveServer

BIG = 2**63
TABLES = ("arena_models", "arena_prompts", "arena_answers", "arena_matches", "arena_votes", "annotators", "sessions",
          "meta")


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    """Three models, three prompts (matches 1-9: 1-3 of prompt 1, ...), bob's own prompt 4
    (matches 10-12), bob's vote on match 1 (submission id bob-1); alice signed in like a browser."""
    tmp = tmp_path_factory.mktemp("arena-hostile")
    store = FeedbackStore(tmp / "feedback.db")
    ids = [store.add_arena_model(n, f"/ckpt/{n}") for n in ("zebra", "okapi", "lemur")]
    for i in range(3):
        store.add_arena_prompt([{"role": "user", "content": f"prompt {i}"}], {m: {"text": f"answer {i}.{m}"} for m in ids})
    tokens = {n: store.add_annotator(n) for n in ("alice", "bob")}
    bob = store.annotator("bob")
    store.add_arena_prompt([{"role": "user", "content": "bob's own"}], {m: {"text": f"own {m}"} for m in ids}, owner=bob)
    store.arena_vote(bob, 1, 1, "a", "bob-1")
    server = LiveServer(tmp / "feedback.db", tmp / "server.log").start()
    with httpx.Client(base_url=server.url, follow_redirects=True) as c:
        nonce = re.search(r'name="csrf" value="([^"]+)"', c.get("/login").text).group(1)
        r = c.post("/login", data={"csrf": nonce, "token": tokens["alice"], "next": "/arena"})
        assert r.status_code == 200, r.text
        cookie = f"llmtrain_session_{server.port}={c.cookies[f'llmtrain_session_{server.port}']}"
        csrf = re.search(r'<meta name="csrf-token" content="([^"]+)"', r.text).group(1)
    yield {"server": server, "db": tmp / "feedback.db", "tokens": tokens, "cookie": cookie, "csrf": csrf,
           "log": tmp / "server.log"}
    server.stop()


def fingerprint(db) -> list:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return [con.execute(f"SELECT * FROM {t} ORDER BY 1, 2").fetchall() for t in TABLES]
    finally:
        con.close()


def vote(**over) -> dict:
    return {"match_id": 2, "prompt_id": 1, "vote": "a", "submission_id": "s-1", **over}


def without(key: str) -> dict:
    return {k: v for k, v in vote().items() if k != key}


J = {"Content-Type": "application/json"}
V = "/api/arena/vote"
# (id, method, path, auth, request kwargs, status, a piece of the reason)
# auth: "bearer" (alice's token), "cookie" (alice's session + the CSRF header), "cookie-nocsrf", "cookie-badcsrf", "none"
CASES = [
    ("match-zero", "POST", V, "bearer", {"json": vote(match_id=0)}, 400, "match_id must be an integer from 1"),
    ("match-negative", "POST", V, "bearer", {"json": vote(match_id=-1)}, 400, "match_id"),
    ("match-2**63", "POST", V, "bearer", {"json": vote(match_id=BIG)}, 400, "match_id"),
    ("match-float", "POST", V, "bearer", {"json": vote(match_id=2.0)}, 400, "match_id"),
    ("match-string", "POST", V, "bearer", {"json": vote(match_id="2")}, 400, "match_id"),
    ("match-bool", "POST", V, "bearer", {"json": vote(match_id=True)}, 400, "match_id"),
    ("match-null", "POST", V, "bearer", {"json": vote(match_id=None)}, 400, "match_id"),
    ("match-list", "POST", V, "bearer", {"json": vote(match_id=[2])}, 400, "match_id"),
    ("match-missing", "POST", V, "bearer", {"json": without("match_id")}, 400, "match_id"),
    ("match-unknown", "POST", V, "bearer", {"json": vote(match_id=999)}, 400, "no arena match with id 999"),
    ("match-of-bobs-own-prompt", "POST", V, "bearer", {"json": vote(match_id=10, prompt_id=4)}, 400,
     "no arena match with id 10"),
    ("prompt-zero", "POST", V, "bearer", {"json": vote(prompt_id=0)}, 400, "prompt_id must be an integer from 1"),
    ("prompt-string", "POST", V, "bearer", {"json": vote(prompt_id="1")}, 400, "prompt_id"),
    ("prompt-missing", "POST", V, "bearer", {"json": without("prompt_id")}, 400, "prompt_id"),
    ("vote-for-another-prompt", "POST", V, "bearer", {"json": vote(prompt_id=2)}, 400,
     "arena match 2 is of prompt 1, not of prompt 2"),
    ("vote-for-an-unknown-prompt", "POST", V, "bearer", {"json": vote(prompt_id=77)}, 400, "not of prompt 77"),
    ("vote-upper-case", "POST", V, "bearer", {"json": vote(vote="A")}, 400, "vote must be one of a, b, tie, both_bad"),
    ("vote-draw", "POST", V, "bearer", {"json": vote(vote="draw")}, 400, "vote must be one of"),
    ("vote-model-name", "POST", V, "bearer", {"json": vote(vote="zebra")}, 400, "vote must be one of"),
    ("vote-number", "POST", V, "bearer", {"json": vote(vote=1)}, 400, "vote must be one of"),
    ("vote-null", "POST", V, "bearer", {"json": vote(vote=None)}, 400, "vote must be one of"),
    ("vote-list", "POST", V, "bearer", {"json": vote(vote=["a"])}, 400, "vote must be one of"),
    ("vote-empty", "POST", V, "bearer", {"json": vote(vote="")}, 400, "vote must be one of"),
    ("vote-padded", "POST", V, "bearer", {"json": vote(vote="tie ")}, 400, "vote must be one of"),
    ("vote-missing", "POST", V, "bearer", {"json": without("vote")}, 400, "vote must be one of"),
    ("vote-surrogate", "POST", V, "bearer",
     {"content": '{"match_id": 2, "prompt_id": 1, "vote": "\\ud800", "submission_id": "x"}'.encode(), "headers": J},
     400, "vote"),
    ("sid-missing", "POST", V, "bearer", {"json": without("submission_id")}, 400, "submission_id"),
    ("sid-number", "POST", V, "bearer", {"json": vote(submission_id=5)}, 400, "submission_id"),
    ("sid-empty", "POST", V, "bearer", {"json": vote(submission_id="")}, 400, "submission_id"),
    ("sid-too-long", "POST", V, "bearer", {"json": vote(submission_id="x" * 101)}, 400, "submission_id"),
    ("sid-newline", "POST", V, "bearer", {"json": vote(submission_id="a\nb")}, 400, "control characters"),
    ("sid-of-bobs-vote", "POST", V, "bearer", {"json": vote(submission_id="bob-1")}, 400,
     "this submission id belongs to another vote"),
    ("unknown-field", "POST", V, "bearer", {"json": vote(winner="zebra")}, 400, "unknown field winner"),
    ("body-not-json", "POST", V, "bearer", {"content": b"match_id=2", "headers": J}, 400, "not valid JSON"),
    ("body-a-list", "POST", V, "bearer", {"json": [vote()]}, 400, "must be a JSON object"),
    ("body-form", "POST", V, "bearer", {"data": {"match_id": "2"}}, 415, "send JSON"),
    ("body-too-large", "POST", V, "bearer", {"json": vote(pad="x" * 70_000)}, 413, "too large"),
    ("cookie-without-csrf", "POST", V, "cookie-nocsrf", {"json": vote()}, 403, "CSRF"),
    ("cookie-wrong-csrf", "POST", V, "cookie-badcsrf", {"json": vote()}, 403, "CSRF"),
    ("cookie-csrf-foreign-origin", "POST", V, "cookie", {"json": vote(), "headers": {"Origin": "http://evil.example"}},
     403, "CSRF"),
    ("no-credentials", "POST", V, "none", {"json": vote()}, 401, "annotator token"),
    ("get-vote", "GET", V, "bearer", {}, 405, "GET is not allowed"),
    ("match-page-zero", "GET", "/api/arena/match/0", "bearer", {}, 404, "no arena match with id 0"),
    ("match-page-letters", "GET", "/api/arena/match/abc", "bearer", {}, 404, "no arena match with id abc"),
    ("match-page-huge", "GET", "/api/arena/match/" + "9" * 25, "bearer", {}, 404, "no arena match with id 999"),
    ("match-page-unknown", "GET", "/api/arena/match/999", "bearer", {}, 404, "no arena match with id 999"),
    ("match-page-bobs-own", "GET", "/api/arena/match/11", "bearer", {}, 404, "no arena match with id 11"),
    ("arena-page-bad-match", "GET", "/arena?match=x1", "cookie", {}, 400, "?match= must be a match number"),
    ("ask-without-worker", "POST", "/api/arena/ask", "bearer", {"json": {"prompt": "Why?"}}, 501,
     "need the models served"),
    ("ask-empty", "POST", "/api/arena/ask", "bearer", {"json": {"prompt": "  "}}, 400, "prompt must be a string"),
    ("ask-too-long", "POST", "/api/arena/ask", "bearer", {"json": {"prompt": "x" * 4001}}, 400, "1-4000 characters"),
    ("ask-number", "POST", "/api/arena/ask", "bearer", {"json": {"prompt": 7}}, 400, "prompt must be a string"),
    ("ask-unknown-field", "POST", "/api/arena/ask", "bearer", {"json": {"prompt": "a", "model": "zebra"}}, 400,
     "unknown field model"),
    ("ask-cookie-without-csrf", "POST", "/api/arena/ask", "cookie-nocsrf", {"json": {"prompt": "a"}}, 403, "CSRF"),
]


def send(live, method, path, auth, kwargs):
    headers = dict(kwargs.get("headers") or {})
    if auth == "bearer":
        headers["Authorization"] = f"Bearer {live['tokens']['alice']}"
    elif auth.startswith("cookie"):
        headers["Cookie"] = live["cookie"]
        if auth == "cookie":
            headers["X-CSRF-Token"] = live["csrf"]
        elif auth == "cookie-badcsrf":
            headers["X-CSRF-Token"] = "0" * len(live["csrf"])
    with httpx.Client(base_url=live["server"].url, timeout=30) as c:
        return c.request(method, path, **{**kwargs, "headers": headers})


def reason(r: httpx.Response) -> str:
    if r.headers.get("content-type", "").startswith("text/html"):
        m = re.search(r'<p class="error" role="alert">(.*?)</p>', r.text)
        assert m, r.text[:300]
        return html.unescape(m.group(1))
    text = r.json()["error"]
    assert "\n" not in text
    return text


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_hostile_arena_input_is_a_4xx_with_a_reason(live, case):
    name, method, path, auth, kwargs, status, why = case
    before_db = fingerprint(live["db"])
    before_log = live["log"].stat().st_size
    r = send(live, method, path, auth, kwargs)
    assert r.status_code == status, (name, r.status_code, r.text[:300])
    assert why in reason(r), (name, reason(r))
    for h in ("content-security-policy", "x-content-type-options", "x-frame-options", "referrer-policy"):
        assert h in r.headers, (name, h)
    for n in ("zebra", "okapi", "lemur"):  # no refusal names a model
        assert n not in r.text or n in str(kwargs), (name, r.text)
    time.sleep(0.05)  # the server logs an unhandled exception after answering
    log = live["log"].read_bytes()[before_log:].decode("utf-8", "replace")
    assert "Traceback" not in log and "ERROR" not in log and "Exception" not in log, log[-3000:]
    assert fingerprint(live["db"]) == before_db, name


def test_a_good_vote_still_works_after_the_storm(live):
    """Last in the module: the same request as most cases, made good, is recorded once."""
    r = send(live, "POST", V, "cookie", {"json": vote(submission_id="after-the-storm")})
    assert r.status_code == 200 and r.json()["recorded"] is True
    assert set(r.json()["reveal"].values()) <= {"zebra", "okapi", "lemur"}
    log = live["log"].read_text(errors="replace")
    assert "Traceback" not in log and "ERROR" not in log, log[-3000:]
