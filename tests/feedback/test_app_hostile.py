"""Hostile input to the ranking app, against the real server under uvicorn: each case is one
request a tester or an attacker would send. Every case must get the expected 4xx with a one-line
reason that names the thing, the security headers, no traceback (or error line) in the server
log, and leave the database exactly as it was."""
from __future__ import annotations

import json
import re
import socket
import sqlite3
import time

import httpx
import pytest

from llmtrain.feedback.store import FeedbackStore

from webapp_helpers import LiveServer

BIG = 2**63


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hostile")
    store = FeedbackStore(tmp / "feedback.db")
    for i in range(2):
        store.add_prompt(f"prompt {i}", [{"text": f"answer {i}.{j}"} for j in range(3)])
    tokens = {n: store.add_annotator(n) for n in ("alice", "bob")}
    server = LiveServer(tmp / "feedback.db", tmp / "server.log").start()
    # alice signs in like a browser: the session cookie and the page's CSRF token
    with httpx.Client(base_url=server.url, follow_redirects=True) as c:
        nonce = re.search(r'name="csrf" value="([^"]+)"', c.get("/login").text).group(1)
        r = c.post("/login", data={"csrf": nonce, "token": tokens["alice"], "next": "/"})
        assert r.status_code == 200, r.text
        cookie_name = f"llmtrain_session_{server.port}"
        sid = c.cookies[cookie_name]
        csrf = re.search(r'<meta name="csrf-token" content="([^"]+)"', r.text).group(1)
    yield {"server": server, "db": tmp / "feedback.db", "tokens": tokens, "cookie": f"{cookie_name}={sid}",
           "csrf": csrf, "log": tmp / "server.log"}
    server.stop()


def fingerprint(db) -> list:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return [con.execute(f"SELECT * FROM {t} ORDER BY 1, 2").fetchall()
                for t in ("prompts", "candidates", "annotators", "rankings", "sessions", "meta")]
    finally:
        con.close()


def good(**over) -> dict:
    return {"prompt_id": 1, "status": "ranked", "ranking": [[0], [1], [2]], "submission_id": "s-1", **over}


def raw(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")


J = {"Content-Type": "application/json"}
NESTED = "[" * 30_000 + "]" * 30_000
DIGITS = "7" * 5000

# (id, method, path, auth, request kwargs, status, a piece of the reason)
# auth: "bearer" (alice's token), "cookie" (alice's session + the CSRF header), "cookie-nocsrf", "none"
CASES = [
    # /api/submit: prompt_id
    ("pid-2**63", "POST", "/api/submit", "bearer", {"json": good(prompt_id=BIG)}, 400, "prompt_id"),
    ("pid-below-int64", "POST", "/api/submit", "bearer", {"json": good(prompt_id=-BIG - 1)}, 400, "prompt_id"),
    ("pid-10**30", "POST", "/api/submit", "bearer", {"json": good(prompt_id=10**30)}, 400, "prompt_id"),
    ("pid-5000-digits", "POST", "/api/submit", "bearer",
     {"content": '{"prompt_id": %s, "status": "skipped", "submission_id": "x"}' % DIGITS, "headers": J}, 400, "digits"),
    ("pid-float", "POST", "/api/submit", "bearer", {"json": good(prompt_id=1.5)}, 400, "prompt_id"),
    ("pid-string", "POST", "/api/submit", "bearer", {"json": good(prompt_id="1")}, 400, "prompt_id"),
    ("pid-bool", "POST", "/api/submit", "bearer", {"json": good(prompt_id=True)}, 400, "prompt_id"),
    ("pid-null", "POST", "/api/submit", "bearer", {"json": good(prompt_id=None)}, 400, "prompt_id"),
    ("pid-list", "POST", "/api/submit", "bearer", {"json": good(prompt_id=[1])}, 400, "prompt_id"),
    ("pid-zero", "POST", "/api/submit", "bearer", {"json": good(prompt_id=0)}, 400, "prompt_id"),
    ("pid-missing", "POST", "/api/submit", "bearer",
     {"json": {"status": "skipped", "submission_id": "x"}}, 400, "prompt_id"),
    ("pid-nan", "POST", "/api/submit", "bearer",
     {"content": '{"prompt_id": NaN, "status": "skipped", "submission_id": "x"}', "headers": J}, 400, "prompt_id"),
    ("pid-infinity", "POST", "/api/submit", "bearer",
     {"content": '{"prompt_id": -Infinity, "status": "skipped", "submission_id": "x"}', "headers": J}, 400, "prompt_id"),
    ("pid-unknown", "POST", "/api/submit", "bearer", {"json": good(prompt_id=999)}, 400, "no prompt with id 999"),
    # status
    ("status-list", "POST", "/api/submit", "bearer", {"json": good(status=["ranked"])}, 400, "status"),
    ("status-object", "POST", "/api/submit", "bearer", {"json": good(status={"a": 1})}, 400, "status"),
    ("status-number", "POST", "/api/submit", "bearer", {"json": good(status=1)}, 400, "status"),
    ("status-unknown", "POST", "/api/submit", "bearer", {"json": good(status="RANKED")}, 400, "status"),
    ("status-surrogate", "POST", "/api/submit", "bearer",
     {"content": raw('{"prompt_id": 1, "status": "\\ud800", "submission_id": "x"}'), "headers": J}, 400, "status"),
    # ranking
    ("ranking-string", "POST", "/api/submit", "bearer", {"json": good(ranking="0,1,2")}, 400, "ranking"),
    ("ranking-object", "POST", "/api/submit", "bearer", {"json": good(ranking={"0": 1})}, 400, "ranking"),
    ("ranking-huge-index", "POST", "/api/submit", "bearer", {"json": good(ranking=[[0], [1], [2**70]])}, 400, "ranking"),
    ("ranking-negative", "POST", "/api/submit", "bearer", {"json": good(ranking=[[0], [1], [-1]])}, 400, "ranking"),
    ("ranking-bool", "POST", "/api/submit", "bearer", {"json": good(ranking=[[0], [1], [True]])}, 400, "ranking"),
    ("ranking-null-index", "POST", "/api/submit", "bearer", {"json": good(ranking=[[0], [1], [None]])}, 400, "ranking"),
    ("ranking-float", "POST", "/api/submit", "bearer", {"json": good(ranking=[[0.0], [1], [2]])}, 400, "ranking"),
    ("ranking-empty", "POST", "/api/submit", "bearer", {"json": good(ranking=[])}, 400, "ranking"),
    ("ranking-nested-lists", "POST", "/api/submit", "bearer", {"json": good(ranking=[[[0]], [1], [2]])}, 400, "ranking"),
    ("ranking-twice", "POST", "/api/submit", "bearer", {"json": good(ranking=[[0], [0], [1], [2]])}, 400, "ranking"),
    # a ranking sent with a status that has none is refused, never silently dropped
    ("skipped-with-ranking", "POST", "/api/submit", "bearer", {"json": good(status="skipped")}, 400,
     "ranking must be left out (or null) when status is skipped"),
    ("all-bad-with-ranking", "POST", "/api/submit", "bearer", {"json": good(status="all_bad")}, 400,
     "ranking must be left out (or null) when status is all_bad"),
    ("skipped-with-empty-ranking", "POST", "/api/submit", "bearer", {"json": good(status="skipped", ranking=[])}, 400,
     "ranking"),
    ("skipped-with-ranking-string", "POST", "/api/submit", "bearer", {"json": good(status="skipped", ranking="0")}, 400,
     "ranking"),
    # submission_id
    ("sid-lone-surrogate", "POST", "/api/submit", "bearer",
     {"content": raw('{"prompt_id": 1, "status": "skipped", "submission_id": "\\ud800"}'), "headers": J}, 400, "submission_id"),
    ("sid-low-surrogate-inside", "POST", "/api/submit", "bearer",
     {"content": raw('{"prompt_id": 1, "status": "skipped", "submission_id": "ab\\udfffcd"}'), "headers": J},
     400, "submission_id"),
    ("sid-number", "POST", "/api/submit", "bearer", {"json": good(submission_id=123)}, 400, "submission_id"),
    ("sid-list", "POST", "/api/submit", "bearer", {"json": good(submission_id=["a"])}, 400, "submission_id"),
    ("sid-empty", "POST", "/api/submit", "bearer", {"json": good(submission_id="")}, 400, "submission_id"),
    ("sid-too-long", "POST", "/api/submit", "bearer", {"json": good(submission_id="x" * 101)}, 400, "submission_id"),
    ("sid-nul", "POST", "/api/submit", "bearer", {"json": good(submission_id="a\x00b")}, 400, "submission_id"),
    ("sid-only-nul", "POST", "/api/submit", "bearer", {"json": good(submission_id="\x00")}, 400, "submission_id"),
    ("sid-newline", "POST", "/api/submit", "bearer", {"json": good(submission_id="s\nforged log line")}, 400,
     "submission_id"),
    ("sid-escape", "POST", "/api/submit", "bearer", {"json": good(submission_id="\x1b[31mred")}, 400, "submission_id"),
    ("sid-del", "POST", "/api/submit", "bearer", {"json": good(submission_id="x\x7f")}, 400, "submission_id"),
    ("sid-c1-control", "POST", "/api/submit", "bearer", {"json": good(submission_id="x\x85y")}, 400, "submission_id"),
    # the body as a whole
    ("key-surrogate", "POST", "/api/submit", "bearer",
     {"content": raw('{"prompt_id": 1, "\\ud800": 1, "status": "skipped", "submission_id": "x"}'), "headers": J},
     400, "field name"),
    ("unknown-field", "POST", "/api/submit", "bearer", {"json": good(extra=1)}, 400, "unknown field extra"),
    ("unknown-field-proto", "POST", "/api/submit", "bearer", {"json": good(__proto__={})}, 400, "unknown field __proto__"),
    ("body-list", "POST", "/api/submit", "bearer", {"json": [1, 2]}, 400, "JSON object"),
    ("body-string", "POST", "/api/submit", "bearer", {"json": "hello"}, 400, "JSON object"),
    ("body-null", "POST", "/api/submit", "bearer", {"content": "null", "headers": J}, 400, "JSON object"),
    ("body-broken-json", "POST", "/api/submit", "bearer", {"content": "{", "headers": J}, 400, "not valid JSON"),
    ("body-empty", "POST", "/api/submit", "bearer", {"content": "", "headers": J}, 400, "not valid JSON"),
    ("body-not-utf8", "POST", "/api/submit", "bearer",
     {"content": b'{"prompt_id": 1, "status": "\xff\xfe"}', "headers": J}, 400, "UTF-8"),
    ("nested-30000", "POST", "/api/submit", "bearer", {"content": NESTED, "headers": J}, 400, "nested too deeply"),
    ("nested-objects-20", "POST", "/api/submit", "bearer",
     {"content": '{"a":' * 20 + "1" + "}" * 20, "headers": J}, 400, "nested too deeply"),
    ("nested-30000-bogus-token", "POST", "/api/submit", "none",
     {"content": NESTED, "headers": {**J, "Authorization": "Bearer bogus"}}, 401, "token"),
    ("nested-30000-no-csrf", "POST", "/api/submit", "cookie-nocsrf", {"content": NESTED, "headers": J}, 403, "CSRF"),
    ("body-too-large", "POST", "/api/submit", "bearer", {"json": good(pad="x" * 70_000)}, 413, "too large"),
    ("body-too-large-chunked", "POST", "/api/submit", "bearer",
     {"content": iter([b'{"pad": "', b"x" * 40_000, b"x" * 40_000, b'"}']), "headers": J}, 413, "too large"),
    ("content-type-text", "POST", "/api/submit", "bearer",
     {"content": json.dumps(good()), "headers": {"Content-Type": "text/plain"}}, 415, "Content-Type"),
    ("content-type-missing", "POST", "/api/submit", "bearer", {"content": json.dumps(good())}, 415, "Content-Type"),
    # /api/change
    ("change-pid-2**63", "POST", "/api/change", "bearer", {"json": good(prompt_id=BIG)}, 400, "prompt_id"),
    ("change-unknown-field", "POST", "/api/change", "bearer", {"json": good(evil=True)}, 400, "unknown field evil"),
    ("change-status-surrogate", "POST", "/api/change", "bearer",
     {"content": raw('{"prompt_id": 1, "status": "\\udc00"}'), "headers": J}, 400, "status"),
    ("change-nested", "POST", "/api/change", "bearer", {"content": NESTED, "headers": J}, 400, "nested too deeply"),
    ("change-skipped-with-ranking", "POST", "/api/change", "bearer", {"json": good(status="skipped")}, 400,
     "ranking must be left out"),
    ("change-not-judged", "POST", "/api/change", "bearer", {"json": good(status="skipped", ranking=None)}, 404, "no judgement of prompt 1"),
    # ids in URLs
    ("prompt-20-digits", "GET", "/api/prompt/99999999999999999999", "bearer", {}, 404, "no prompt with id 99999999999999999999"),
    ("prompt-2**63", "GET", f"/api/prompt/{BIG}", "bearer", {}, 404, f"no prompt with id {BIG}"),
    ("prompt-superscript", "GET", "/api/prompt/%C2%B2", "bearer", {}, 404, "no prompt with id \\xb2"),
    ("prompt-5000-digits", "GET", f"/api/prompt/{DIGITS}", "bearer", {}, 404, "no prompt with id 7777"),
    ("prompt-zero", "GET", "/api/prompt/0", "bearer", {}, 404, "no prompt with id 0"),
    ("prompt-negative", "GET", "/api/prompt/-1", "bearer", {}, 404, "no prompt with id -1"),
    ("prompt-exponent", "GET", "/api/prompt/1e3", "bearer", {}, 404, "no prompt with id 1e3"),
    ("prompt-emoji", "GET", "/api/prompt/%F0%9F%98%80", "bearer", {}, 404, "no prompt with id"),
    ("prompt-arabic-digit", "GET", "/api/prompt/%D9%A1", "bearer", {}, 404, "no prompt with id \\u0661"),
    ("judgement-20-digits", "GET", "/api/judgement/99999999999999999999", "bearer", {}, 404, "no judgement of prompt 9999"),
    ("judgement-superscript", "GET", "/api/judgement/%C2%B9", "bearer", {}, 404, "no judgement of prompt \\xb9"),
    ("page-prompt-superscript", "GET", "/?prompt=%C2%B2", "cookie", {}, 400, "?prompt= must be a prompt number"),
    ("page-prompt-5000-digits", "GET", f"/?prompt={DIGITS}", "cookie", {}, 400, "?prompt= must be a prompt number"),
    ("page-prompt-20-digits", "GET", "/?prompt=99999999999999999999", "cookie", {}, 400, "?prompt="),
    ("page-prompt-negative", "GET", "/?prompt=-1", "cookie", {}, 400, "?prompt="),
    ("page-prompt-word", "GET", "/?prompt=abc", "bearer", {}, 400, "?prompt="),
    ("page-prompt-bad-utf8", "GET", "/?prompt=%ED%A0%80", "cookie", {}, 400, "?prompt="),
    # CSRF tokens that are not ASCII (hmac.compare_digest refuses non-ASCII str)
    ("csrf-header-latin1", "POST", "/api/submit", "cookie-nocsrf",
     {"json": good(), "headers": {"X-CSRF-Token": "é".encode("latin-1")}}, 403, "CSRF"),
    ("csrf-header-utf8", "POST", "/api/submit", "cookie-nocsrf",
     {"json": good(), "headers": {"X-CSRF-Token": ("ü" * 64).encode()}}, 403, "CSRF"),
    ("csrf-header-change-latin1", "POST", "/api/change", "cookie-nocsrf",
     {"json": good(), "headers": {"X-CSRF-Token": b"\xff" * 64}}, 403, "CSRF"),
    ("csrf-header-wrong-origin", "POST", "/api/submit", "cookie",
     {"json": good(), "headers": {"Origin": "http://evil.example"}}, 403, "CSRF"),
    ("csrf-header-non-ascii-forged-session", "POST", "/api/submit", "none",
     {"json": good(), "headers": {"Cookie": "llmtrain_session_{port}=forged", "X-CSRF-Token": "é".encode("latin-1")}},
     401, "token"),
    ("csrf-form-non-ascii", "POST", "/logout", "cookie-nocsrf", {"data": {"csrf": "é" * 64}}, 403, "CSRF"),
    ("csrf-form-not-utf8", "POST", "/logout", "cookie-nocsrf",
     {"content": b"csrf=%FF%FE\xff", "headers": {"Content-Type": "application/x-www-form-urlencoded"}}, 403, "CSRF"),
    ("csrf-form-missing", "POST", "/logout", "cookie-nocsrf", {"data": {}}, 403, "CSRF"),
    # the sign-in form
    ("login-nonce-non-ascii", "POST", "/login", "none",
     {"data": {"csrf": "é", "token": "x"}, "headers": {"Cookie": "llmtrain_login_{port}=%C3%A9"}}, 403, "sign-in form expired"),
    ("login-nonce-latin1-cookie", "POST", "/login", "none",
     {"data": {"csrf": "ü", "token": "x"}, "headers": {"Cookie": "llmtrain_login_{port}=é".encode("latin-1")}}, 403,
     "sign-in form expired"),
    ("login-no-nonce", "POST", "/login", "none", {"data": {"token": "x"}}, 403, "sign-in form expired"),
    ("login-body-too-large", "POST", "/login", "none", {"data": {"token": "x" * 70_000}}, 413, "too large"),
    ("login-non-ascii-token", "POST", "/login", "login-nonce", {"data": {"token": "tökén\u202e"}}, 401, "token is not valid"),
    # credentials
    ("bearer-latin1", "GET", "/api/next", "none", {"headers": {"Authorization": b"Bearer \xe9\xe9"}}, 401, "token"),
    ("bearer-4000-chars", "GET", "/api/next", "none", {"headers": {"Authorization": "Bearer " + "a" * 4000}}, 401, "token"),
    ("session-latin1", "GET", "/api/next", "none",
     {"headers": {"Cookie": "llmtrain_session_{port}=\xe9\xff".encode("latin-1")}}, 401, "token"),
    ("session-forged", "GET", "/api/next", "none", {"headers": {"Cookie": "llmtrain_session_{port}=" + "A" * 43}}, 401, "token"),
    ("session-other-port-name", "GET", "/api/next", "other-port-cookie", {}, 401, "token"),
    # routes and methods
    ("get-submit", "GET", "/api/submit", "bearer", {}, 405, "GET is not allowed"),
    ("put-change", "PUT", "/api/change", "bearer", {"json": good()}, 405, "PUT is not allowed"),
    ("no-such-api", "GET", "/api/nothing", "bearer", {}, 404, "no such page: /api/nothing"),
    ("static-traversal", "GET", "/static/..%2F..%2Fstore.py", "none", {}, 404, "no such page"),
    ("static-nul", "GET", "/static/%00", "none", {}, 404, "no such page"),
]


def _send(live, method, path, auth, kwargs):
    port = live["server"].port
    headers = {}
    for k, v in (kwargs.get("headers") or {}).items():
        headers[k] = v.replace(b"{port}", str(port).encode()) if isinstance(v, bytes) else v.replace("{port}", str(port))
    kwargs = {**kwargs, "headers": headers}
    with httpx.Client(base_url=live["server"].url, timeout=30) as c:
        if auth == "bearer":
            headers["Authorization"] = f"Bearer {live['tokens']['alice']}"
        elif auth in ("cookie", "cookie-nocsrf"):
            headers["Cookie"] = live["cookie"]
            if auth == "cookie":
                headers.setdefault("X-CSRF-Token", live["csrf"])
        elif auth == "other-port-cookie":  # a valid session under another port's cookie name
            headers["Cookie"] = live["cookie"].replace(f"_{port}=", f"_{port + 1}=")
        elif auth == "login-nonce":
            page = c.get("/login")
            kwargs["data"] = {**kwargs["data"], "csrf": re.search(r'name="csrf" value="([^"]+)"', page.text).group(1)}
        return c.request(method, path, **kwargs)


def _reason(r: httpx.Response) -> str:
    ctype = r.headers.get("content-type", "")
    if ctype.startswith("application/json"):
        reason = r.json()["error"]
        assert "\n" not in reason
        return reason
    if ctype.startswith("text/html"):
        m = re.search(r'<p class="error" role="alert">(.*?)</p>', r.text)
        assert m, r.text[:300]
        import html

        return html.unescape(m.group(1))
    assert "\n" not in r.text.strip()
    return r.text


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_hostile_input_is_a_4xx_with_a_reason(live, case):
    name, method, path, auth, kwargs, status, reason = case
    before_db = fingerprint(live["db"])
    before_log = live["log"].stat().st_size
    r = _send(live, method, path, auth, kwargs)
    assert r.status_code == status, (name, r.status_code, r.text[:300])
    assert reason in _reason(r), (name, _reason(r))
    for h in ("content-security-policy", "x-content-type-options", "x-frame-options", "referrer-policy"):
        assert h in r.headers, (name, h)
    assert "frame-ancestors 'none'" in r.headers["content-security-policy"]
    time.sleep(0.05)  # the server logs an unhandled exception after answering
    log = live["log"].read_bytes()[before_log:].decode("utf-8", "replace")
    assert "Traceback" not in log and "ERROR" not in log and "Exception" not in log, log[-3000:]
    assert fingerprint(live["db"]) == before_db, name


def test_hostile_cases_count():
    assert len(CASES) >= 50


def test_a_good_submission_still_works_and_the_log_is_clean(live):
    """Last in the module: the server survived every case, and its whole log has no traceback."""
    with httpx.Client(base_url=live["server"].url) as c:
        r = c.post("/api/submit", json=good(submission_id="after-the-storm"),
                   headers={"Authorization": f"Bearer {live['tokens']['bob']}"})
        assert r.status_code == 200 and r.json()["recorded"] is True
        # the hostile ids did not break the edit page for a real id either
        r = c.get("/?prompt=1", headers={"Cookie": live["cookie"]})
        assert r.status_code == 200 and 'data-prompt="1"' in r.text
    log = live["log"].read_text(errors="replace")
    assert "Traceback" not in log and "ERROR" not in log, log[-3000:]


def _slow_request(live, path: str, headers: dict, sent: bytes, length: int) -> socket.socket:
    """Open a request whose body never finishes arriving: `sent` of `length` bytes."""
    s = socket.create_connection(("127.0.0.1", live["server"].port), timeout=30)
    head = "".join(f"{k}: {v}\r\n" for k, v in {**headers, "Content-Length": str(length)}.items())
    s.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{live['server'].port}\r\n{head}\r\n".encode() + sent)
    return s


def _read_response(s: socket.socket) -> bytes:
    data = b""
    while chunk := s.recv(65536):  # the server closes the connection after a 408
        data += chunk
    return data


@pytest.mark.parametrize("path, auth", [("/api/submit", "bearer"), ("/login", "none")])
def test_a_body_that_arrives_too_slowly_is_cut_off_with_408(live, path, auth):
    before_db = fingerprint(live["db"])
    before_log = live["log"].stat().st_size
    headers = {"Content-Type": "application/json" if path.startswith("/api/") else "application/x-www-form-urlencoded"}
    if auth == "bearer":
        headers["Authorization"] = f"Bearer {live['tokens']['alice']}"
    elif auth == "cookie":
        headers["Cookie"] = live["cookie"]
    t0 = time.monotonic()
    slow = _slow_request(live, path, headers, b'{"prompt_i', 100)
    try:
        # other requests go on meanwhile
        with httpx.Client(base_url=live["server"].url, timeout=5) as c:
            for _ in range(3):
                r = c.get("/api/next", headers={"Authorization": f"Bearer {live['tokens']['bob']}"})
                assert r.status_code == 200
        assert time.monotonic() - t0 < 3
        answer = _read_response(slow)
    finally:
        slow.close()
    took = time.monotonic() - t0
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408"), answer[:300]
    assert b"content-security-policy" in head.lower()
    reason = json.loads(body)["error"]
    assert "the request body did not arrive within 5 s" == reason
    assert 4 < took < 15, took
    time.sleep(0.05)
    log = live["log"].read_bytes()[before_log:].decode("utf-8", "replace")
    assert "Traceback" not in log and "ERROR" not in log and "Exception" not in log, log[-3000:]
    assert fingerprint(live["db"]) == before_db
