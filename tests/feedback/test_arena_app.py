"""The arena's HTTP surface through Starlette's TestClient: blind until the vote, sides per
annotator, exactly-once votes, the closed round, the admin's figures, and the hook for a
person's own prompt (a stand-in model worker)."""
from __future__ import annotations

import math
import re
import uuid
from types import SimpleNamespace

import pytest
from starlette.testclient import TestClient

from llmtrain.feedback.app import create_app
from llmtrain.feedback.simulate import arena_simulate
from llmtrain.feedback.store import FeedbackStore

BASE = "http://127.0.0.1:8000"
NAMES = ("zebra-7b", "okapi-2")


@pytest.fixture
def env(tmp_path):
    db = tmp_path / "feedback.db"
    store = FeedbackStore(db)
    ids = [store.add_arena_model(n, f"/ckpt/{n}") for n in NAMES]
    for i in range(8):
        store.add_arena_prompt([{"role": "user", "content": f"Question {i}?"}],
                               {m: {"text": f"answer {i}/{j}" + " more" * j, "finished": j == 0} for j, m in enumerate(ids)})
    tokens = {n: store.add_annotator(n, is_admin=n == "root") for n in ("alice", "bob", "root")}
    return SimpleNamespace(db=db, store=store, ids=ids, tokens=tokens, app=create_app(str(db)))


def client(env, name: str, app=None) -> TestClient:
    c = TestClient(app or env.app, base_url=BASE)
    c.headers["Authorization"] = f"Bearer {env.tokens[name]}"
    return c


def cast(c: TestClient, m: dict, vote: str = "a", sid: str | None = None):
    return c.post("/api/arena/vote", json={"match_id": m["id"], "prompt_id": m["prompt_id"], "vote": vote,
                                           "submission_id": sid or str(uuid.uuid4())})


def sides(env, c: TestClient, mid: int) -> list[str]:
    """The model behind side A and side B as this client sees match `mid` (by the answer texts)."""
    m = env.store.arena_match(mid)
    owner = {m["x"]["text"]: m["x"]["name"], m["y"]["text"]: m["y"]["name"]}
    return [owner[a["text"]] for a in c.get(f"/api/arena/match/{mid}").json()["match"]["answers"]]


def test_names_appear_only_after_the_vote(env):
    alice = client(env, "alice")
    seen = []
    for path in ("/arena", "/api/arena/next", "/api/arena/match/1", "/api/session", "/api/next", "/api/progress",
                 "/api/mine", "/mine", "/", "/api/arena/match/2"):
        r = alice.get(path)
        assert r.status_code == 200, path
        seen.append(r.text)
    m = alice.get("/api/arena/next").json()["match"]
    assert [a["side"] for a in m["answers"]] == ["A", "B"]
    assert set(m) == {"id", "prompt_id", "prompt", "context", "own", "answers"}  # no model, no model id
    assert set(m["answers"][0]) == {"side", "text", "finished", "n_tokens"}
    for text in seen:
        assert not any(n in text for n in NAMES) and "/ckpt/" not in text
    r = cast(alice, m, "b")
    assert r.status_code == 200
    reveal = r.json()["reveal"]
    assert [reveal["A"], reveal["B"]] == sides(env, alice, m["id"])
    view = alice.get(f"/api/arena/match/{m['id']}").json()
    assert view["vote"]["vote"] == "b" and view["vote"]["reveal"] == reveal
    other = next(i for i in range(1, 9) if i != m["id"])  # the other matches stay blind
    assert not any(n in alice.get(f"/api/arena/match/{other}").text for n in NAMES)
    assert not any(n in alice.get("/api/arena/next").text for n in NAMES)


def test_a_vote_is_recorded_once(env):
    alice = client(env, "alice")
    m = alice.get("/api/arena/next").json()["match"]
    first = cast(alice, m, "a", "sid-1").json()
    again = cast(alice, m, "a", "sid-1").json()  # a retried request
    other = cast(alice, m, "b", "sid-2").json()  # a second vote on the same match
    assert (first["recorded"], again["recorded"], other["recorded"]) == (True, False, False)
    assert again["duplicate"] and other["duplicate"] and other["vote"] == "a" and other["reveal"] == first["reveal"]
    assert [(v["annotator"], v["vote"]) for v in env.store.arena_votes()] == [("alice", "a")]
    assert first["progress"] == {"voted": 1, "total": 8} and alice.get("/api/arena/next").json()["match"]["id"] != m["id"]


def test_sides_stay_put_for_one_annotator_and_differ_between_annotators(env):
    alice, bob = client(env, "alice"), client(env, "bob")
    a = {mid: sides(env, alice, mid) for mid in range(1, 9)}
    b = {mid: sides(env, bob, mid) for mid in range(1, 9)}
    assert a == {mid: sides(env, alice, mid) for mid in range(1, 9)}  # reloads
    assert any(a[mid] == b[mid][::-1] for mid in a)  # some match bob sees the other way round
    assert {tuple(s) for s in a.values()} == {NAMES, NAMES[::-1]}
    # a vote for side A is a vote for the model alice saw there
    mid = next(mid for mid in a if a[mid] != b[mid])
    m = alice.get(f"/api/arena/match/{mid}").json()["match"]
    cast(alice, m, "a")
    cast(bob, m, "a")
    won = {v["annotator"]: v["a"] for v in env.store.arena_votes()}
    assert won == {"alice": a[mid][0], "bob": b[mid][0]} and won["alice"] != won["bob"]


def test_a_closed_round_takes_no_vote(env):
    alice, root = client(env, "alice"), client(env, "root")
    m = alice.get("/api/arena/next").json()["match"]
    assert root.post("/api/admin/close").status_code == 200
    r = cast(alice, m)
    assert r.status_code == 409 and r.json()["closed"] is True and "the round is closed" in r.json()["error"]
    assert env.store.arena_votes() == []
    d = alice.get("/api/arena/next").json()
    assert d["closed"] is True and d["match"] is None
    assert alice.get(f"/api/arena/match/{m['id']}").json()["closed"] is True


def test_csrf_guards_a_cookie_vote(env):
    c = TestClient(env.app, base_url=BASE)
    nonce = re.search(r'name="csrf" value="([^"]+)"', c.get("/login").text).group(1)
    c.post("/login", data={"csrf": nonce, "token": env.tokens["alice"], "next": "/arena"}, follow_redirects=False)
    page = c.get("/arena")
    assert page.status_code == 200 and 'href="/arena" aria-current=page' in page.text
    csrf = re.search(r'<meta name="csrf-token" content="([^"]+)"', page.text).group(1)
    m = c.get("/api/arena/next").json()["match"]
    body = {"match_id": m["id"], "prompt_id": m["prompt_id"], "vote": "tie", "submission_id": "c-1"}
    assert c.post("/api/arena/vote", json=body).status_code == 403
    assert env.store.arena_votes() == []
    r = c.post("/api/arena/vote", json=body, headers={"X-CSRF-Token": csrf})
    assert r.status_code == 200 and r.json()["recorded"] is True


def test_the_admin_sees_win_rates_and_bradley_terry_scores(env):
    alice, root = client(env, "alice"), client(env, "root")
    for _ in range(8):
        m = alice.get("/api/arena/next").json()["match"]
        cast(alice, m, "tie")
    arena_simulate(env.store, "length")  # the shorter answer: always zebra-7b
    assert alice.get("/api/admin").status_code == 403
    a = root.get("/api/admin").json()["arena"]
    assert a["counts"] == {"models": 2, "prompts": 8, "matches": 8, "votes": 16} and a["simulated_votes"] == 8
    pair = a["everyone"]["pairs"][0]
    # okapi-2 against zebra-7b: 8 losses to the rule, 8 ties with alice: 4 points of 16
    assert (pair["model"], pair["against"], pair["votes"], pair["losses"], pair["ties"]) == ("okapi-2", "zebra-7b", 16, 8, 8)
    assert pair["win_rate"] == 0.25 and pair["lo"] < 0.25 < pair["hi"]
    bt = a["everyone"]["bradley_terry"]
    assert bt["finite"] and bt["centred"]
    zebra, okapi = bt["models"]
    assert zebra["score"] == pytest.approx(-okapi["score"])
    assert zebra["score"] - okapi["score"] == pytest.approx(math.log(3))  # 12 points to 4: odds 3
    people = a["people"]["pairs"][0]
    assert people["votes"] == 8 and people["ties"] == 8 and people["win_rate"] == 0.5
    page = root.get("/admin").text
    assert 'id="arena-pairs-everyone"' in page and 'id="arena-bt-people"' in page and "0.250" in page


class Worker:
    """A stand-in for the model worker: each model answers with its name reversed and the prompt."""

    def __init__(self, bad: bool = False):
        self.calls, self.bad = [], bad

    def answer(self, models, messages):
        self.calls.append(([m["name"] for m in models], messages))
        if self.bad:
            return {models[0]["name"]: {"text": 5}}
        return {m["name"]: {"text": f"{m['name'][::-1]}: {messages[-1]['content']}", "n_tokens": 9} for m in models}


def test_the_hook_for_a_persons_own_prompt(env):
    worker = Worker()
    app = create_app(str(env.db), arena_worker=worker)
    alice, bob = client(env, "alice", app), client(env, "bob", app)
    assert 'id="ask"' in alice.get("/arena").text
    r = alice.post("/api/arena/ask", json={"prompt": "Is tea better than coffee?"})
    assert r.status_code == 200, r.text
    m = r.json()["match"]
    assert m["own"] and m["prompt"] == "Is tea better than coffee?" and r.json()["matches"] == 1
    assert worker.calls == [(list(NAMES), [{"role": "user", "content": "Is tea better than coffee?"}])]
    assert not any(n in r.text for n in NAMES)
    assert bob.get(f"/api/arena/match/{m['id']}").status_code == 404  # alice's own, not bob's
    assert alice.get("/api/arena/next").json()["progress"]["total"] == 9
    assert bob.get("/api/arena/next").json()["progress"]["total"] == 8
    assert cast(alice, m, "b").json()["recorded"] is True
    bad = client(env, "alice", create_app(str(env.db), arena_worker=Worker(bad=True)))
    r = bad.post("/api/arena/ask", json={"prompt": "Again?"})
    assert r.status_code == 502 and "no answer for arena model zebra-7b" in r.json()["error"]
    assert env.store.arena_counts()["prompts"] == 9
    assert client(env, "root", app).post("/api/admin/close").status_code == 200
    assert alice.post("/api/arena/ask", json={"prompt": "Closed?"}).status_code == 409
    assert len(worker.calls) == 1  # refused before the worker was asked


def test_no_arena_no_nav_link(tmp_path):
    store = FeedbackStore(tmp_path / "f.db")
    store.add_prompt("q", [{"text": "a"}, {"text": "b"}])
    token = store.add_annotator("ann")
    c = TestClient(create_app(str(tmp_path / "f.db")), base_url=BASE)
    c.headers["Authorization"] = f"Bearer {token}"
    assert 'href="/arena"' not in c.get("/").text
    assert c.get("/api/arena/next").json() == {"match": None, "progress": {"voted": 0, "total": 0}, "closed": False}
