"""Sessions, revocation, token rotation, throttled sign-ins and a locked database in the ranking
app; `feedback import` all or nothing and every exported line importable."""
from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from types import SimpleNamespace

import httpx
import pytest
from starlette.testclient import TestClient

from llmtrain.feedback.app import create_app
from llmtrain.feedback.export import export, import_rankings
from llmtrain.feedback.store import FeedbackStore

from webapp_helpers import REPO, LiveServer

BASE = "http://127.0.0.1:8000"
COOKIE = "llmtrain_session_8000"


@pytest.fixture
def env(tmp_path):
    db = tmp_path / "feedback.db"
    store = FeedbackStore(db)
    prompts = [store.add_prompt(f"prompt {i}", [{"text": f"answer {i}.{j}"} for j in range(3)]) for i in range(3)]
    tokens = {n: store.add_annotator(n) for n in ("alice", "bob")}
    return SimpleNamespace(db=db, store=store, prompts=prompts, tokens=tokens, app=create_app(str(db)))


def sign_in(app, token: str, base: str = BASE, client=("testclient", 50000)) -> tuple[TestClient, object]:
    c = TestClient(app, base_url=base, client=client)
    nonce = re.search(r'name="csrf" value="([^"]+)"', c.get("/login").text).group(1)
    r = c.post("/login", data={"csrf": nonce, "token": token, "next": "/"}, follow_redirects=False)
    return c, r


def session_rows(db) -> list:
    con = sqlite3.connect(db)
    try:
        return con.execute("SELECT id_hash, annotator_id FROM sessions").fetchall()
    finally:
        con.close()


def cli(*args) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "llmtrain", *args], capture_output=True, text=True, env=env, cwd=REPO)


def test_the_cookie_holds_a_session_id_stored_hashed_never_the_token(env):
    c, r = sign_in(env.app, env.tokens["alice"])
    assert r.status_code == 303
    cookies = [v for k, v in r.headers.multi_items() if k == "set-cookie" and v.startswith(COOKIE + "=")]
    assert len(cookies) == 1
    cookie = cookies[0]
    sid = cookie.split(";")[0].split("=", 1)[1]
    flags = [f.strip().lower() for f in cookie.split(";")[1:]]
    assert "httponly" in flags and "samesite=strict" in flags and "path=/" in flags
    assert env.tokens["alice"] not in r.headers.get("set-cookie", "") and sid != env.tokens["alice"]
    # only the hash of the id is stored, with the annotator
    rows = session_rows(env.db)
    assert rows == [(hashlib.sha256(sid.encode()).hexdigest(), env.store.annotator("alice").id)]
    assert sid not in str(rows)
    assert c.get("/api/session").json()["annotator"] == "alice"


def test_cookie_names_are_bound_to_the_port_and_https_uses_host_prefix_and_secure(env):
    _, r = sign_in(env.app, env.tokens["alice"], base="http://127.0.0.1:8001")
    assert r.headers["set-cookie"].startswith("llmtrain_session_8001=")
    sid = r.headers["set-cookie"].split(";")[0].split("=", 1)[1]
    # a session presented under another port's name is not ours
    plain = TestClient(env.app, base_url=BASE)
    assert plain.get("/api/next", headers={"Cookie": f"llmtrain_session_8001={sid}"}).status_code == 401
    assert plain.get("/api/next", headers={"Cookie": f"{COOKIE}={sid}"}).status_code == 200  # the same session, our name
    c, r = sign_in(env.app, env.tokens["bob"], base="https://127.0.0.1:8443")
    cookie = next(v for k, v in r.headers.multi_items() if k == "set-cookie" and "session" in v)
    assert cookie.startswith("__Host-llmtrain_session_8443=")
    assert "secure" in cookie.lower() and "path=/" in cookie.lower() and "domain" not in cookie.lower()
    assert c.get("/api/session").json()["annotator"] == "bob"


def test_logout_revokes_the_session_on_the_server(env):
    c, _ = sign_in(env.app, env.tokens["alice"])
    sid = c.cookies[COOKIE]
    csrf = c.get("/api/session").json()["csrf"]
    r = c.post("/logout", data={"csrf": csrf}, follow_redirects=False)
    assert r.status_code == 303 and session_rows(env.db) == []
    # the old cookie, replayed by anyone, is worth nothing now
    old = TestClient(env.app, base_url=BASE)
    assert old.get("/api/next", headers={"Cookie": f"{COOKIE}={sid}"}).status_code == 401
    r = old.get("/", headers={"Cookie": f"{COOKIE}={sid}"}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"].startswith("/login")
    r = old.post("/api/submit", json={"prompt_id": env.prompts[0], "status": "skipped", "submission_id": "x"},
                 headers={"Cookie": f"{COOKIE}={sid}", "X-CSRF-Token": csrf})
    assert r.status_code == 401 and env.store.judgements() == []
    # the token itself still signs in
    assert sign_in(env.app, env.tokens["alice"])[1].status_code == 303


def test_a_signed_in_browser_signing_in_again_ends_its_old_session(env):
    c, _ = sign_in(env.app, env.tokens["alice"])
    first = c.cookies[COOKIE]
    nonce = re.search(r'name="csrf" value="([^"]+)"', c.get("/login").text).group(1)
    assert c.post("/login", data={"csrf": nonce, "token": env.tokens["bob"]}, follow_redirects=False).status_code == 303
    assert len(session_rows(env.db)) == 1  # the first (e.g. one planted from another port) is gone
    assert TestClient(env.app, base_url=BASE).get("/api/next", headers={"Cookie": f"{COOKIE}={first}"}).status_code == 401


def test_an_expired_session_is_refused(env):
    sid = env.store.create_session(env.store.annotator("alice"), ttl=-1)
    assert TestClient(env.app, base_url=BASE).get("/api/next", headers={"Cookie": f"{COOKIE}={sid}"}).status_code == 401
    app = create_app(str(env.db), session_ttl=1.0)
    c, _ = sign_in(app, env.tokens["alice"])
    sid = c.cookies[COOKIE]
    assert c.get("/api/next").status_code == 200
    time.sleep(1.1)  # the server's expiry, whatever the browser does with the cookie
    assert TestClient(app, base_url=BASE).get("/api/next", headers={"Cookie": f"{COOKIE}={sid}"}).status_code == 401


def test_revoke_annotator_ends_their_sessions_and_token(env):
    c, _ = sign_in(env.app, env.tokens["alice"])
    sid = c.cookies[COOKIE]
    bob, _ = sign_in(env.app, env.tokens["bob"])
    r = cli("feedback", "revoke-annotator", "alice", "--db", str(env.db))
    assert r.returncode == 0 and "1 signed-in session(s) ended" in r.stdout, r.stderr
    fresh = TestClient(env.app, base_url=BASE)
    assert fresh.get("/api/next", headers={"Cookie": f"{COOKIE}={sid}"}).status_code == 401
    assert fresh.get("/api/next", headers={"Authorization": f"Bearer {env.tokens['alice']}"}).status_code == 401
    _, r = sign_in(env.app, env.tokens["alice"])
    assert r.status_code == 401 and "not valid" in r.text
    assert bob.get("/api/next").status_code == 200  # others are untouched
    r = cli("feedback", "revoke-annotator", "nobody", "--db", str(env.db))
    assert r.returncode == 2 and r.stderr.strip() == f"llmtrain feedback: error: no annotator named 'nobody' in {env.db}"
    assert "Traceback" not in r.stderr


def test_rotate_token_invalidates_the_old_token_and_its_sessions(env):
    c, _ = sign_in(env.app, env.tokens["bob"])
    sid = c.cookies[COOKIE]
    r = cli("feedback", "rotate-token", "bob", "--db", str(env.db))
    assert r.returncode == 0, r.stderr
    new = r.stdout.strip().splitlines()[-1]
    assert new != env.tokens["bob"] and len(new) >= 32
    fresh = TestClient(env.app, base_url=BASE)
    assert fresh.get("/api/next", headers={"Cookie": f"{COOKIE}={sid}"}).status_code == 401
    assert fresh.get("/api/next", headers={"Authorization": f"Bearer {env.tokens['bob']}"}).status_code == 401
    assert fresh.get("/api/next", headers={"Authorization": f"Bearer {new}"}).status_code == 200
    assert sign_in(env.app, new)[1].status_code == 303
    # rotation re-admits a revoked annotator, with the new token only
    assert cli("feedback", "revoke-annotator", "bob", "--db", str(env.db)).returncode == 0
    newer = cli("feedback", "rotate-token", "bob", "--db", str(env.db)).stdout.strip().splitlines()[-1]
    assert fresh.get("/api/next", headers={"Authorization": f"Bearer {newer}"}).status_code == 200
    assert fresh.get("/api/next", headers={"Authorization": f"Bearer {new}"}).status_code == 401


def bearer(app, token: str, addr: str):
    return TestClient(app, base_url=BASE, client=(addr, 1)).get("/api/next", headers={"Authorization": f"Bearer {token}"})


def test_failed_sign_ins_are_throttled_per_address_and_valid_tokens_never_are(env):
    app = create_app(str(env.db), failed_logins=(5, 1000, 300))
    for i in range(5):
        _, r = sign_in(app, f"guess-{i}", client=("10.0.0.1", 1))
        assert r.status_code == 401
    _, r = sign_in(app, "guess-5", client=("10.0.0.1", 1))  # one failure too many
    assert r.status_code == 429 and 0 < int(r.headers["retry-after"]) <= 301
    assert "Too many failed sign-ins" in r.text and session_rows(env.db) == []
    # Bearer guesses are refused the same way
    r = bearer(app, "guess-6", "10.0.0.1")
    assert r.status_code == 429 and "too many failed sign-ins" in r.json()["error"] and r.headers["retry-after"]
    # the right token still signs in from that very address, by form and by Bearer
    _, r = sign_in(app, env.tokens["alice"], client=("10.0.0.1", 1))
    assert r.status_code == 303 and len(session_rows(env.db)) == 1
    assert bearer(app, env.tokens["alice"], "10.0.0.1").status_code == 200
    # ... and a success does not wipe the address's failures: the next guess is still refused
    assert bearer(app, "guess-7", "10.0.0.1").status_code == 429
    _, r = sign_in(app, "guess-8", client=("10.0.0.1", 1))
    assert r.status_code == 429
    # another address is not held back
    assert bearer(app, "guess-9", "10.0.0.2").status_code == 401


def test_failed_sign_ins_are_throttled_overall_and_valid_tokens_never_are(env):
    app = create_app(str(env.db), failed_logins=(100, 6, 300))
    for i in range(6):
        assert bearer(app, f"guess-{i}", f"10.1.0.{i}").status_code == 401
    _, r = sign_in(app, "guess-x", client=("10.2.0.1", 1))  # everyone's failures together: the ceiling
    assert r.status_code == 429 and int(r.headers["retry-after"]) > 0
    assert bearer(app, "guess-y", "10.2.0.2").status_code == 429
    # valid credentials from anywhere go on working
    _, r = sign_in(app, env.tokens["alice"], client=("10.2.0.1", 1))
    assert r.status_code == 303
    assert bearer(app, env.tokens["bob"], "10.2.0.3").status_code == 200
    sid = env.store.create_session(env.store.annotator("bob"), ttl=60)
    assert TestClient(app, base_url=BASE).get("/api/next", headers={"Cookie": f"{COOKIE}={sid}"}).status_code == 200


def test_noise_from_many_addresses_never_locks_out_a_valid_token(env):
    """The review's repro, with the default limits: 10 wrong Bearer tokens from each of ten
    addresses; a valid token from another address (and from a noisy one) still gets in."""
    app = create_app(str(env.db))
    for a in range(2, 12):
        for i in range(10):
            assert bearer(app, f"wrong-{a}-{i}", f"127.0.0.{a}").status_code in (401, 429)
    assert bearer(app, "wrong", "127.0.0.50").status_code == 429  # the overall ceiling holds for failures
    assert bearer(app, env.tokens["bob"], "127.0.0.50").status_code == 200
    assert bearer(app, env.tokens["bob"], "127.0.0.2").status_code == 200
    _, r = sign_in(app, env.tokens["alice"], client=("127.0.0.3", 1))
    assert r.status_code == 303


def test_after_the_admin_closes_the_round_submits_and_changes_are_409_and_write_nothing(env):
    boss = env.store.add_annotator("boss", is_admin=True)
    alice = {"Authorization": f"Bearer {env.tokens['alice']}"}
    c = TestClient(env.app, base_url=BASE)
    r = c.post("/api/submit", json={"prompt_id": env.prompts[0], "status": "skipped", "submission_id": "before"},
               headers=alice)
    assert r.status_code == 200 and r.json()["recorded"] is True
    assert c.post("/api/admin/close", headers={"Authorization": f"Bearer {boss}"}).status_code == 200
    before = fingerprint(env.db)
    for path, body in [
        ("/api/submit", {"prompt_id": env.prompts[1], "status": "ranked", "ranking": [[0], [1], [2]],
                         "submission_id": "after"}),
        ("/api/submit", {"prompt_id": env.prompts[2], "status": "skipped", "submission_id": "after-2"}),
        ("/api/change", {"prompt_id": env.prompts[0], "status": "ranked", "ranking": [[2], [1], [0]]}),
    ]:
        r = c.post(path, json=body, headers=alice)
        assert r.status_code == 409, (path, r.text)
        assert r.json()["error"].startswith("the round is closed") and "\n" not in r.json()["error"]
        assert r.json()["closed"] is True
    assert fingerprint(env.db) == before
    # a browser session with its CSRF token is refused the same way
    bc, _ = sign_in(env.app, env.tokens["bob"])
    csrf = bc.get("/api/session").json()["csrf"]
    before = fingerprint(env.db)
    r = bc.post("/api/submit", json={"prompt_id": env.prompts[1], "status": "skipped", "submission_id": "b"},
                headers={"X-CSRF-Token": csrf})
    assert r.status_code == 409 and "the round is closed" in r.json()["error"]
    assert fingerprint(env.db) == before
    assert [(j["prompt_id"], j["status"]) for j in env.store.judgements()] == [(env.prompts[0], "skipped")]
    assert bc.get("/api/next").json()["closed"] is True
    assert c.get(f"/api/prompt/{env.prompts[0]}", headers=alice).json()["closed"] is True


def fingerprint(db) -> list:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return [con.execute(f"SELECT * FROM {t} ORDER BY 1, 2").fetchall() for t in ("prompts", "candidates", "rankings")]
    finally:
        con.close()


def test_a_locked_database_answers_503_to_submits_while_reads_go_on(tmp_path):
    store = FeedbackStore(tmp_path / "feedback.db")
    pids = [store.add_prompt(f"p{i}", [{"text": "a"}, {"text": "b"}]) for i in range(30)]
    token = store.add_annotator("alice")
    server = LiveServer(tmp_path / "feedback.db", tmp_path / "server.log").start()
    auth = {"Authorization": f"Bearer {token}"}
    other = sqlite3.connect(tmp_path / "feedback.db", isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")  # another program holds the write lock
        other.execute("INSERT INTO meta VALUES ('held', 'by another writer')")
        results = []

        def submit(pid):
            with httpx.Client(base_url=server.url, timeout=30) as c:
                t = time.monotonic()
                r = c.post("/api/submit", json={"prompt_id": pid, "status": "ranked", "ranking": [[0], [1]],
                                                "submission_id": str(uuid.uuid4())}, headers=auth)
                results.append((r.status_code, r.headers.get("retry-after"), r.json()["error"], time.monotonic() - t))
        threads = [threading.Thread(target=submit, args=(pid,)) for pid in pids]
        [t.start() for t in threads]
        read_times = []
        with httpx.Client(base_url=server.url, timeout=30) as c:
            deadline = time.monotonic() + 2.5
            while time.monotonic() < deadline:  # reads while 30 submits wait for the lock
                t = time.monotonic()
                r = c.get("/api/next", headers=auth)
                read_times.append(time.monotonic() - t)
                assert r.status_code == 200 and r.json()["prompt"]["id"] == pids[0]
        [t.join(60) for t in threads]
        assert len(results) == 30 and {(s, ra) for s, ra, _, _ in results} == {(503, "2")}
        assert all("database is busy" in e for _, _, e, _ in results)
        assert max(d for *_, d in results) < 10  # no submit waits long (busy timeout 2 s, queue bounded)
        assert len(read_times) >= 5 and max(read_times) < 1.5, read_times  # a starved read waits >= 2 s
        with httpx.Client(base_url=server.url, timeout=30) as c:  # signing in needs a write: 503 too, said on the page
            nonce = re.search(r'name="csrf" value="([^"]+)"', c.get("/login").text).group(1)
            r = c.post("/login", data={"csrf": nonce, "token": token})
            assert r.status_code == 503 and r.headers["retry-after"] == "2" and "database is busy" in r.text
        other.execute("ROLLBACK")
        with httpx.Client(base_url=server.url, timeout=30) as c:  # the lock gone, the same submit works
            r = c.post("/api/submit", json={"prompt_id": pids[0], "status": "skipped", "submission_id": "after"},
                       headers=auth)
            assert r.status_code == 200 and r.json()["recorded"] is True
    finally:
        other.close()
        server.stop()
    log = (tmp_path / "server.log").read_text()
    assert "Traceback" not in log and "ERROR" not in log, log[-3000:]
    assert len(store.judgements()) == 1


def test_client_disconnects_are_not_logged_as_errors(tmp_path):
    store = FeedbackStore(tmp_path / "feedback.db")
    store.add_prompt("p", [{"text": "a"}, {"text": "b"}])
    token = store.add_annotator("alice")
    server = LiveServer(tmp_path / "feedback.db", tmp_path / "server.log").start()
    try:
        for i in range(20):  # half a body, then gone; or gone before reading the answer
            with socket.create_connection(("127.0.0.1", server.port)) as s:
                s.sendall((f"POST /api/submit HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n"
                           f"Authorization: Bearer {token}\r\nContent-Type: application/json\r\n"
                           f"Content-Length: 1000\r\n\r\n" + '{"prompt_id": 1,').encode())
                if i % 2:
                    time.sleep(0.05)
        for _ in range(5):
            with socket.create_connection(("127.0.0.1", server.port)) as s:
                s.sendall(f"GET /api/next HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\r\n".encode())
        time.sleep(0.5)
        assert httpx.get(server.url + "/api/next", headers={"Authorization": f"Bearer {token}"}).status_code == 200
    finally:
        server.stop()
    log = (tmp_path / "server.log").read_text()
    assert "Traceback" not in log and "ERROR" not in log and "Exception" not in log, log[-3000:]
    assert store.judgements() == []


def test_a_server_error_still_carries_the_security_headers(env):
    app = create_app(str(env.db))
    app.state.store.next_prompt = lambda annotator: 1 / 0  # a bug
    r = TestClient(app, base_url=BASE, raise_server_exceptions=False).get(
        "/api/next", headers={"Authorization": f"Bearer {env.tokens['alice']}"})
    assert r.status_code == 500 and "internal error" in r.json()["error"] and "ZeroDivision" not in r.text
    assert "frame-ancestors 'none'" in r.headers["content-security-policy"]
    assert r.headers["x-frame-options"] == "DENY" and r.headers["x-content-type-options"] == "nosniff"


def test_a_version_1_database_is_upgraded_and_keeps_working(tmp_path):
    db = tmp_path / "old.db"
    store = FeedbackStore(db)
    token = store.add_annotator("alice")
    store.close()
    con = sqlite3.connect(db)
    con.executescript("DROP TABLE sessions; ALTER TABLE annotators DROP COLUMN disabled;"
                      "UPDATE meta SET value='1' WHERE key='schema_version';")
    con.close()
    store = FeedbackStore(db)
    assert store.annotator_by_token(token).name == "alice"
    assert store.session_annotator(store.create_session(store.annotator("alice"), 60)).name == "alice"


# ---- feedback import: all or nothing; every exported line importable

def rich_store(path) -> FeedbackStore:
    """Every status, ties, a one-tier ranking, repeated answer texts, unicode, multi-turn, cut-off answers."""
    s = FeedbackStore(path)
    p1 = s.add_prompt("Say hi 👋", [{"text": "hi"}, {"text": "hi"}, {"text": "héllo\u2028<b>x</b>"}])
    p2 = s.add_prompt("שלום?", [{"text": "\u202eevil"}, {"text": "ok", "finished": False}],
                      messages=[{"role": "system", "content": "be kind"}, {"role": "user", "content": "hi"},
                                {"role": "assistant", "content": "hello"}, {"role": "user", "content": "שלום?"}])
    p3 = s.add_prompt("tie all", [{"text": "a"}, {"text": "b"}, {"text": "c"}])
    p4 = s.add_prompt("skip me", [{"text": "x"}, {"text": "y"}])
    alice, bob = (s.annotator_by_token(s.add_annotator(n)) for n in ("alice", "bob.b-1"))
    sim = s.ensure_annotator("sim-length", simulated=True)
    s.submit(alice, p1, "ranked", [[2], [0, 1]], "a1")
    s.submit(bob, p1, "ranked", [[1], [2], [0]], "b1")
    s.submit(alice, p2, "all_bad", None, "a2")
    s.submit(sim, p2, "ranked", [[1], [0]], "s2")
    s.submit(alice, p3, "ranked", [[0, 1, 2]], "a3")
    s.submit(alice, p4, "skipped", None, "a4")
    return s


def comparable(path) -> list:
    out = []
    text = path.read_text(encoding="utf-8")
    assert len(text.splitlines()) == text.count("\n")  # no line break but \n, even to str.splitlines
    for line in text.split("\n")[:-1]:
        d = json.loads(line)
        d.pop("source")
        out.append(d)
    return sorted(out, key=lambda d: json.dumps(d, sort_keys=True))


def test_every_exported_line_imports_and_round_trips(tmp_path):
    src = rich_store(tmp_path / "a.db")
    counts = export(src, tmp_path / "r.jsonl")
    assert counts["exported"] == 5 and counts["skipped"] == 1
    dst = FeedbackStore(tmp_path / "b.db")
    assert import_rankings(dst, tmp_path / "r.jsonl") == {"read": 5, "added": 5, "already_there": 0}
    export(dst, tmp_path / "r2.jsonl")
    assert comparable(tmp_path / "r2.jsonl") == comparable(tmp_path / "r.jsonl")
    # the one-tier ranking stays "ranked", the tie and the repeated texts stay as they were
    one_tier = [d for d in comparable(tmp_path / "r2.jsonl") if d["prompt"] == "tie all"]
    assert [d["status"] for d in one_tier] == ["ranked"]
    # importing into the database it came from adds nothing
    assert import_rankings(src, tmp_path / "r.jsonl")["already_there"] == 5
    assert cli("feedback", "add-annotator", "x", "--db", str(tmp_path / "c.db")).returncode == 0
    r = cli("feedback", "import", str(tmp_path / "r.jsonl"), "--db", str(tmp_path / "c.db"))
    assert r.returncode == 0 and "5 read, 5 added" in r.stdout, r.stderr


@pytest.mark.parametrize("bad_line, message", [
    ('{"prompt": "q", "ranked": [{"text": "a", "rank": 1}]}', "at least 2 candidates"),
    ("{not json", "malformed JSON"),
    ('{"prompt": "q", "ranked": [{"text": "a", "rank": 1}, {"text": "b", "rank": 2}], "annotator": "no spaces allowed"}',
     "annotator names"),
    ('{"prompt": "q", "ranked": [' + ", ".join('{"text": "t%d", "rank": %d}' % (i, i + 1) for i in range(10)) + "]}",
     "2 to 9 candidates"),
    # text SQLite cannot store (a lone surrogate, which JSON allows): FILE:LINE and the field
    ('{"prompt": "\\ud800", "ranked": [{"text": "a", "rank": 1}, {"text": "b", "rank": 2}]}',
     "field 'prompt' holds a lone surrogate"),
    ('{"prompt": "q \\udc80", "ranked": [{"text": "a", "rank": 1}, {"text": "b", "rank": 2}]}',
     "field 'prompt' holds a lone surrogate"),
    ('{"prompt": "q", "ranked": [{"text": "a", "rank": 1}, {"text": "b\\udfff", "rank": 2}]}',
     "field 'ranked[1].text' holds a lone surrogate"),
    ('{"messages": [{"role": "system", "content": "\\ud83d"}, {"role": "user", "content": "q"}], '
     '"ranked": [{"text": "a", "rank": 1}, {"text": "b", "rank": 2}]}', "field 'messages[0].content' holds a lone surrogate"),
    ('{"prompt": "q", "ranked": [{"text": "a", "rank": 1}, {"text": "b", "rank": 2}], "annotator": "al\\ud800"}',
     "annotator"),
])
def test_import_is_all_or_nothing(tmp_path, bad_line, message):
    src = rich_store(tmp_path / "a.db")
    export(src, tmp_path / "r.jsonl")
    lines = (tmp_path / "r.jsonl").read_text(encoding="utf-8").split("\n")[:-1]
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines[:3] + [bad_line] + lines[3:]) + "\n", encoding="utf-8")
    dst_path = tmp_path / "b.db"
    dst = FeedbackStore(dst_path)
    dst.add_annotator("existing")
    before = [dst._con().execute(f"SELECT * FROM {t}").fetchall() for t in ("prompts", "candidates", "annotators", "rankings")]
    r = cli("feedback", "import", str(bad), "--db", str(dst_path))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.startswith(f"llmtrain feedback: error: {bad}:4: ") and message in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    after = [dst._con().execute(f"SELECT * FROM {t}").fetchall() for t in ("prompts", "candidates", "annotators", "rankings")]
    assert after == before  # not even the three good lines before it


@pytest.mark.parametrize("action", [["import", "{rankings}"], ["rotate-token", "bob"], ["revoke-annotator", "bob"],
                                    ["export", "-o", "{out}"], ["simulate", "--rule", "length"]])
def test_commands_that_need_a_database_never_create_one(tmp_path, action):
    rankings = tmp_path / "r.jsonl"
    rankings.write_text('{"prompt": "q", "ranked": [{"text": "a", "rank": 1}, {"text": "b", "rank": 2}]}\n',
                        encoding="utf-8")
    args = [a.format(rankings=rankings, out=tmp_path / "out.jsonl") for a in action]
    before = sorted(p.name for p in tmp_path.iterdir())
    r = cli("feedback", *args, "--db", str(tmp_path / "new.db"))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr == f"llmtrain feedback: error: --db {tmp_path / 'new.db'}: no such database " \
                       f"(`llmtrain feedback generate` or `feedback add-annotator` creates one)\n", r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no new.db, no journal, no output


def test_a_busy_port_is_one_line_naming_port_before_anything_starts(tmp_path):
    db = tmp_path / "feedback.db"
    FeedbackStore(db).add_annotator("alice")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        env = dict(os.environ, PYTHONPATH=str(REPO))
        r = subprocess.run([sys.executable, "-m", "llmtrain", "feedback", "serve", "--db", str(db), "--port", str(port)],
                           capture_output=True, text=True, env=env, cwd=REPO, timeout=60)
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert r.stderr == f"llmtrain feedback: error: --port {port}: port {port} is already in use (another server " \
                       f"listens on it; pick another port, or 0 for any free one)\n", r.stderr
    assert r.stdout == ""  # nothing started: no "serving" line, no uvicorn lines
