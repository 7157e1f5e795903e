"""The ranking app's HTTP surface through Starlette's TestClient: authentication, CSRF, scoping
to one's own rankings, idempotent submission, validation, the admin view."""
from __future__ import annotations

import re
import subprocess
import sys
import threading
import uuid
from types import SimpleNamespace

import pytest
from starlette.testclient import TestClient

from llmtrain.feedback.app import create_app, display_order
from llmtrain.feedback.store import FeedbackStore

BASE = "http://127.0.0.1:8000"
API_GETS = ["/api/next", "/api/progress", "/api/session", "/api/mine", "/api/admin", "/api/prompt/1", "/api/judgement/1"]
API_POSTS = ["/api/submit", "/api/change"]
PAGES = ["/", "/mine", "/admin", "/?prompt=1"]


@pytest.fixture
def env(tmp_path):
    db = tmp_path / "feedback.db"
    store = FeedbackStore(db)
    prompts = [store.add_prompt(f"prompt {i}", [{"text": f"answer {i}.{j}"} for j in range(k)])
               for i, k in enumerate([3, 4, 2])]
    tokens = {n: store.add_annotator(n, is_admin=n == "root") for n in ("alice", "bob", "root")}
    return SimpleNamespace(db=db, store=store, prompts=prompts, tokens=tokens,
                           app=create_app(str(db), failed_logins=(1000, 1000, 300)))  # throttling: test_app_sessions.py


def bearer(env, name: str) -> TestClient:
    c = TestClient(env.app, base_url=BASE)
    c.headers["Authorization"] = f"Bearer {env.tokens[name]}"
    return c


def login(env, name: str) -> tuple[TestClient, str]:
    """A browser-like session: the login form sets the cookie; returns (client, csrf token)."""
    c = TestClient(env.app, base_url=BASE)
    page = c.get("/login")
    nonce = re.search(r'name="csrf" value="([^"]+)"', page.text).group(1)
    r = c.post("/login", data={"csrf": nonce, "token": env.tokens[name], "next": "/"}, follow_redirects=False)
    assert r.status_code == 303, r.text
    csrf = re.search(r'<meta name="csrf-token" content="([^"]+)"', c.get("/").text).group(1)
    return c, csrf


def body(pid, ranking=None, status="ranked", sid=None):
    return {"prompt_id": pid, "status": status, "ranking": ranking, "submission_id": sid or str(uuid.uuid4())}


def test_requests_without_a_valid_token_are_refused(env):
    for headers in ({}, {"Authorization": "Bearer not-a-token"}, {"Cookie": "llmtrain_session_8000=not-a-token"}):
        c = TestClient(env.app, base_url=BASE)
        for path in API_GETS:
            r = c.get(path, headers=headers)
            assert r.status_code == 401, (path, headers, r.status_code)
            assert "error" in r.json()
        for path in API_POSTS:
            r = c.post(path, json=body(env.prompts[0], [[0], [1], [2]]), headers=headers)
            assert r.status_code == 401, (path, headers, r.status_code)
        for path in PAGES:
            r = c.get(path, headers=headers, follow_redirects=False)
            assert r.status_code == 303 and r.headers["location"].startswith("/login?next="), (path, r.status_code)
    assert env.store.judgements() == []
    assert TestClient(env.app, base_url=BASE).get("/api/next").headers["www-authenticate"] == "Bearer"
    assert TestClient(env.app, base_url=BASE).get("/static/rank.js").status_code == 200  # assets are public


def test_login_sets_a_strict_httponly_cookie_and_refuses_bad_tokens(env):
    c = TestClient(env.app, base_url=BASE)
    nonce = re.search(r'name="csrf" value="([^"]+)"', c.get("/login").text).group(1)
    r = c.post("/login", data={"csrf": nonce, "token": "wrong", "next": "/"}, follow_redirects=False)
    assert r.status_code == 401 and "not valid" in r.text
    nonce = re.search(r'name="csrf" value="([^"]+)"', r.text).group(1)
    r = c.post("/login", data={"csrf": nonce, "token": env.tokens["alice"], "next": "//evil.example/"},
               follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/"  # no open redirect
    cookie = next(v for k, v in r.headers.multi_items() if k == "set-cookie" and v.startswith("llmtrain_session_8000="))
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie
    assert c.get("/api/session").json()["annotator"] == "alice"
    # the login form itself is CSRF-protected (double submit): no nonce, no session
    fresh = TestClient(env.app, base_url=BASE)
    r = fresh.post("/login", data={"token": env.tokens["bob"]}, follow_redirects=False)
    assert r.status_code == 403 and "llmtrain_session" not in r.headers.get("set-cookie", "")


def test_cookie_writes_need_the_csrf_token(env):
    c, csrf = login(env, "alice")
    _, bob_csrf = login(env, "bob")
    p = env.prompts[0]
    for headers in ({}, {"X-CSRF-Token": "0" * 64}, {"X-CSRF-Token": bob_csrf},
                    {"X-CSRF-Token": csrf, "Origin": "http://evil.example"}):
        r = c.post("/api/submit", json=body(p, [[0], [1], [2]]), headers=headers)
        assert r.status_code == 403 and r.json()["csrf"] is True, headers
        assert c.post("/api/change", json=body(p, [[0], [1], [2]]), headers=headers).status_code == 403
    assert c.post("/logout", data={}, follow_redirects=False).status_code == 403
    assert env.store.judgements() == []
    r = c.post("/api/submit", json=body(p, [[0], [1], [2]]), headers={"X-CSRF-Token": csrf, "Origin": BASE})
    assert r.status_code == 200 and r.json()["recorded"] is True
    # a bearer call involves no cookie, so it needs no CSRF token
    assert bearer(env, "alice").post("/api/submit", json=body(env.prompts[1], status="skipped")).json()["recorded"]
    # logging out with the token clears the cookie
    r = c.post("/logout", data={"csrf": csrf}, follow_redirects=False)
    assert r.status_code == 303 and c.get("/api/next").status_code == 401


def test_an_annotator_sees_and_changes_only_their_own_rankings(env):
    alice, bob, root = bearer(env, "alice"), bearer(env, "bob"), bearer(env, "root")
    p = env.prompts[0]
    sid = str(uuid.uuid4())
    assert alice.post("/api/submit", json=body(p, [[2], [0], [1]], sid=sid)).json()["recorded"]
    for other in (bob, root):  # not even an admin reads someone's rankings
        assert other.get(f"/api/judgement/{p}").status_code == 404
        assert other.get("/api/mine").json() == {"judgements": []}
        r = other.post("/api/change", json=body(p, status="all_bad"))
        assert r.status_code == 404
        assert other.get(f"/api/prompt/{p}").json()["judgement"] is None
    assert "prompt 0" not in bob.get("/mine").text and "Nothing yet" in bob.get("/mine").text
    assert "prompt 0" in alice.get("/mine").text
    # reusing alice's submission id does not touch her ranking
    assert bob.post("/api/submit", json=body(p, [[0], [1], [2]], sid=sid)).status_code == 400
    assert env.store.judgements() == [j for j in env.store.judgements() if j["annotator"] == "alice"]
    mine = alice.get(f"/api/judgement/{p}").json()
    assert mine["status"] == "ranked" and mine["ranking"] == [[2], [0], [1]]
    assert [j["prompt_id"] for j in alice.get("/api/mine").json()["judgements"]] == [p]


def test_a_double_submit_records_once(env):
    alice = bearer(env, "alice")
    p, sid = env.prompts[0], str(uuid.uuid4())
    first = alice.post("/api/submit", json=body(p, [[1], [0, 2]], sid=sid))
    again = alice.post("/api/submit", json=body(p, [[1], [0, 2]], sid=sid))
    assert first.status_code == again.status_code == 200
    assert (first.json()["recorded"], first.json()["duplicate"]) == (True, False)
    assert (again.json()["recorded"], again.json()["duplicate"]) == (False, True)
    # a second submission of the same prompt (new id: e.g. two tabs) does not replace the first
    assert alice.post("/api/submit", json=body(env.prompts[0], [[0], [1], [2]])).json()["duplicate"] is True
    # and eight racing retries of one submission record it once
    p2, sid2, results = env.prompts[1], str(uuid.uuid4()), []

    def post():
        results.append(bearer(env, "alice").post("/api/submit", json=body(p2, [[3], [2], [1], [0]], sid=sid2)).json())
    threads = [threading.Thread(target=post) for _ in range(8)]
    [t.start() for t in threads]
    [t.join(30) for t in threads]
    assert sorted(r["recorded"] for r in results) == [False] * 7 + [True]
    js = env.store.judgements()
    assert [(j["prompt_id"], j["ranking"]) for j in js] == [(p, [[1], [0, 2]]), (p2, [[3], [2], [1], [0]])]


@pytest.mark.parametrize("payload, message", [
    ({"status": "ranked", "ranking": [[0], [1]]}, "exactly once"),  # K=3: one missing
    ({"status": "ranked", "ranking": [[0], [0], [1], [2]]}, "exactly once"),
    ({"status": "ranked", "ranking": [[0], [], [1, 2]]}, "non-empty"),
    ({"status": "ranked", "ranking": [[0], ["1"], [2]]}, "candidate indices"),
    ({"status": "ranked", "ranking": [[0], [1.0], [2]]}, "candidate indices"),
    ({"status": "ranked", "ranking": None}, "tiers"),
    ({"status": "great", "ranking": [[0], [1], [2]]}, "status"),
    ({"status": "ranked", "ranking": [[0], [1], [2]], "prompt_id": 999}, "no prompt"),
    ({"status": "ranked", "ranking": [[0], [1], [2]], "prompt_id": "1"}, "prompt_id"),
    ({"status": "ranked", "ranking": [[0], [1], [2]], "submission_id": ""}, "submission_id"),
    ({"status": "ranked", "ranking": [[0], [1], [2]], "submission_id": "x" * 101}, "submission_id"),
])
def test_bad_submissions_are_400_with_a_message(env, payload, message):
    b = {**body(env.prompts[0]), **payload}
    r = bearer(env, "alice").post("/api/submit", json=b)
    assert r.status_code == 400 and message in r.json()["error"], r.json()
    assert env.store.judgements() == []


def test_malformed_bodies(env):
    alice = bearer(env, "alice")
    assert alice.post("/api/submit", content=b"{not json", headers={"Content-Type": "application/json"}).status_code == 400
    assert alice.post("/api/submit", json=[1, 2]).status_code == 400
    assert alice.post("/api/submit", content=b"prompt_id=1", headers={"Content-Type": "text/plain"}).status_code == 415
    big = body(env.prompts[0], [[0], [1], [2]], sid="x")
    big["pad"] = "x" * 70_000
    assert alice.post("/api/submit", json=big).status_code == 413
    assert env.store.judgements() == []


def test_admin_view_refuses_non_admins_and_shows_agreement(env):
    alice, bob, root = bearer(env, "alice"), bearer(env, "bob"), bearer(env, "root")
    assert alice.get("/api/admin").status_code == 403
    assert alice.get("/admin").status_code == 403
    p0, p1, p2 = env.prompts
    # p0 (K=3): alice 0>1>2, bob 0>2>1: 2 concordant pairs, 1 discordant, tau = 1/3
    # p2 (K=2): alice 0>1, bob 1>0: 0 concordant, 1 discordant, tau = -1
    for client, pid, ranking in [(alice, p0, [[0], [1], [2]]), (bob, p0, [[0], [2], [1]]),
                                 (alice, p2, [[0], [1]]), (bob, p2, [[1], [0]])]:
        assert client.post("/api/submit", json=body(pid, ranking)).json()["recorded"]
    assert alice.post("/api/submit", json=body(p1, status="all_bad")).json()["recorded"]
    d = root.get("/api/admin").json()
    [pair] = d["agreement"]["pairs"]
    assert (pair["a"], pair["b"], pair["shared_prompts"]) == ("alice", "bob", 2)
    assert pair["pairwise_agreement"] == pytest.approx(2 / 4)
    assert pair["kendall_tau"] == pytest.approx((1 / 3 - 1) / 2)
    prog = {p["annotator"]: p for p in d["progress"]}
    assert (prog["alice"]["done"], prog["alice"]["ranked"], prog["alice"]["all_bad"], prog["alice"]["total"]) == (3, 2, 1, 3)
    assert (prog["bob"]["done"], prog["root"]["done"]) == (2, 0)
    page = root.get("/admin").text
    assert "0.500" in page and "-0.333" in page and "3 / 3" in page


def test_display_order_is_shuffled_per_annotator_and_stable(env):
    alice = bearer(env, "alice")
    a = alice.get("/api/next").json()["prompt"]
    assert a == alice.get("/api/next").json()["prompt"] == alice.get(f"/api/prompt/{a['id']}").json()["prompt"]
    assert sorted(c["idx"] for c in a["candidates"]) == [0, 1, 2]
    assert [c["label"] for c in a["candidates"]] == ["A", "B", "C"]
    assert all(c["text"] == f"answer 0.{c['idx']}" for c in a["candidates"])
    orders = {tuple(display_order(ann, pid, 5)) for ann in range(1, 4) for pid in range(1, 10)}
    assert len(orders) > 10  # not one fixed order
    assert display_order(1, 2, 5) == display_order(1, 2, 5)


def test_next_progress_skip_and_change(env):
    alice = bearer(env, "alice")
    p0, p1, p2 = env.prompts
    assert alice.post("/api/submit", json=body(p0, [[0, 1], [2]])).json()["recorded"]
    assert alice.post("/api/submit", json=body(p1, status="skipped")).json()["recorded"]
    d = alice.get("/api/next").json()
    assert d["prompt"]["id"] == p2
    assert d["progress"] == {"done": 2, "total": 3, "ranked": 1, "skipped": 1, "all_bad": 0}
    assert alice.post("/api/change", json={"prompt_id": p1, "status": "ranked", "ranking": [[3], [2], [1], [0]]}).json()["ok"]
    assert alice.get(f"/api/judgement/{p1}").json()["ranking"] == [[3], [2], [1], [0]]
    assert alice.post("/api/change", json={"prompt_id": p1, "status": "maybe"}).status_code == 400
    assert alice.post("/api/change", json={"prompt_id": p1, "status": "ranked", "ranking": [[0]]}).status_code == 400
    assert alice.post("/api/change", json={"prompt_id": p2, "status": "all_bad"}).status_code == 404  # not judged yet
    assert alice.post("/api/submit", json=body(p2, status="all_bad")).json()["recorded"]
    assert alice.get("/api/next").json()["prompt"] is None


def test_pages_escape_model_text_and_send_a_csp(env):
    pid = env.store.add_prompt("<script>alert(1)</script>", [{"text": "<img src=x onerror=alert(1)>"}, {"text": "b"}])
    alice = bearer(env, "alice")
    assert alice.post("/api/submit", json=body(pid, [[0], [1]])).json()["recorded"]
    for path in ("/", "/mine", f"/?prompt={pid}", "/login"):
        r = alice.get(path)
        assert r.status_code == 200
        csp = r.headers["content-security-policy"]
        assert "default-src 'self'" in csp and "script-src 'self'" in csp and "unsafe-inline" not in csp
        assert r.headers["x-content-type-options"] == "nosniff" and r.headers["x-frame-options"] == "DENY"
        assert "<script>alert" not in r.text and not re.search(r"<script(?![^>]*\bsrc=)[^>]*>", r.text)  # no inline JS
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in alice.get("/mine").text
    # the API returns model text as JSON data, for the page to set with textContent
    assert alice.get(f"/api/prompt/{pid}").json()["prompt"]["prompt"] == "<script>alert(1)</script>"


def test_the_app_does_not_import_torch():
    code = "import sys, llmtrain.feedback.app; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
