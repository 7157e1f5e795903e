"""`llmtrain demo --human` without a browser: the rankings stage with people (a skip never
blocks it, an admin closes the round), a busy port and a held-out split that cannot work are
one-line errors before anything waits or is written, the ranking app's round label and close
control, and what the report says about where the rankings came from.

The rankings stage runs in-process on a small feedback database (no model is needed for it);
people are played by HTTP calls with bearer tokens of annotators the test adds itself.
"""
from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import httpx
import pytest
from starlette.testclient import TestClient

from llmtrain import cli, pipeline
from llmtrain.pipeline import human, steps
from llmtrain.data.preference import prompt_key
from llmtrain.errors import ConfigError, DataError
from llmtrain.feedback.app import create_app
from llmtrain.feedback.store import FeedbackStore

REPO = Path(__file__).resolve().parents[2]
# The rankings stage's config: every other prompt held out, batches of one, no DPO.
STAGE = ["feedback.port=0", "reward.data.val_every=2", "reward.run.batch_size=1", "methods=[ppo]"]


def convs(n: int) -> list[list[dict]]:
    return [[{"role": "user", "content": f"Question number {i}?"}] for i in range(n)]


def held_out(msgs, every: int = 2) -> bool:
    return int(prompt_key(msgs), 16) % every == 0


class Stage:
    """The pipeline's rankings stage with --human, run in a thread over a database of n prompts
    (each asked `rounds` times). .person / .admin: httpx clients with bearer tokens."""

    def __init__(self, tmp_path: Path, monkeypatch, n: int = 6, rounds: int = 1, overrides=()):
        self.cfg = pipeline.load(pipeline.DEMO_CONFIG, [f"run_dir={tmp_path / 'run'}", *STAGE, *overrides])
        self.r = pipeline.Run(tmp_path / "run")
        self.r.feedback.mkdir(parents=True)
        self.store = FeedbackStore(self.r.db)
        gid = self.store.add_generation({"k": 3, "rounds": rounds})
        self.convs = convs(n)
        self.ids = [self.store.add_prompt(c[-1]["content"], [{"text": f"answer {j}"} for j in range(3)], gid, c)
                    for _ in range(rounds) for c in self.convs]
        self.tokens = {"person": self.store.add_annotator("person"), "boss": self.store.add_annotator("boss", is_admin=True)}
        self.ports: list[int] = []
        start = human.start_app
        self.apps: list[threading.Thread] = []

        def start_app(*a):
            port, app = start(*a)
            self.ports.append(port)
            self.apps.append(app)
            return port, app
        monkeypatch.setattr(human, "start_app", start_app)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        try:
            steps.rankings(self.cfg, self.r, True)
        except BaseException as e:  # handed to the test
            self.error = e

    def start(self) -> "Stage":
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.ports:
            assert self.thread.is_alive() or self.ports, f"the stage ended early: {self.error!r}"
            assert time.monotonic() < deadline, "the ranking app did not come up"
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.ports[0]}"
        self.person = httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {self.tokens['person']}"}, timeout=10)
        self.admin = httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {self.tokens['boss']}"}, timeout=10)
        return self

    def judge(self, pid: int, status: str = "ranked") -> None:
        r = self.person.post("/api/submit", json={"prompt_id": pid, "status": status, "submission_id": str(uuid.uuid4()),
                                                  "ranking": [[0], [1], [2]] if status == "ranked" else None})
        assert r.status_code == 200, r.text

    def finish(self, timeout: float = 15.0) -> None:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the pipeline is still waiting"

    def close(self) -> None:
        self.r.cleanup.close()


def lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_one_skip_never_blocks_the_pipeline(tmp_path, monkeypatch, capsys):
    st = Stage(tmp_path, monkeypatch, n=6).start()
    try:
        skipped = st.ids[1]
        for pid in st.ids:
            st.judge(pid, "skipped" if pid == skipped else "ranked")
        st.finish()
        assert st.error is None, st.error
        out = capsys.readouterr().out
        assert "still open: #" in out and "6 of 6 prompts judged by people (5 ranked)" in out
        got = lines(st.r.rankings)
        assert sorted(x["source"]["prompt_id"] for x in got) == [p for p in st.ids if p != skipped]
        assert all(not x["simulated"] and x["annotator"] == "person" for x in got)
        assert "5 exported (5 by people, 0 by the rule" in out and "1 skipped, left out" in out
        assert st.store.round_closed()  # while the run goes on, the page says the round is over
        assert st.person.get("/api/next").json()["closed"] is True
    finally:
        st.close()
    assert not st.store.round_closed()  # the run is over: a later run or `feedback serve` finds it open
    with pytest.raises(httpx.TransportError):
        httpx.get(st.url + "/login", timeout=2)  # and the app has stopped
    assert not list(st.r.feedback.glob("*.pending"))


def test_the_terminal_and_the_admin_say_what_is_open_and_the_admin_closes_the_round(tmp_path, monkeypatch, capsys):
    st = Stage(tmp_path, monkeypatch, n=8).start()
    try:
        held = [p for p, c in zip(st.ids, st.convs) if held_out(c)]
        train = [p for p, c in zip(st.ids, st.convs) if not held_out(c)]
        assert held and len(train) >= 2
        ranked = [held[0], train[0], train[1]]
        for pid in ranked:
            st.judge(pid)
        st.judge(train[-1], "all_bad")
        time.sleep(1.5)  # a poll of the stage
        assert st.thread.is_alive()  # 4 of 8 judged: still waiting
        rnd = st.admin.get("/api/admin").json()["round"]
        assert rnd == {"closed": False, "prompts": 8, "open": sorted(set(st.ids) - set(ranked) - {train[-1]})}
        assert st.person.post("/api/admin/close").status_code == 403  # admins only
        assert st.thread.is_alive()
        assert st.admin.post("/api/admin/close").json() == {"ok": True, "closed": True}
        st.finish()
        assert st.error is None, st.error
        out = capsys.readouterr().out
        assert "4 still open: " in out and "an admin closed the round" in out
        got = lines(st.r.rankings)
        assert sorted(x["source"]["prompt_id"] for x in got if x["status"] == "ranked") == sorted(ranked)
    finally:
        st.close()


def test_a_round_closed_with_no_ranking_stops_with_one_line(tmp_path, monkeypatch):
    st = Stage(tmp_path, monkeypatch, n=6).start()
    try:
        st.judge(st.ids[0], "skipped")
        st.judge(st.ids[1], "all_bad")
        assert st.admin.post("/api/admin/close").status_code == 200
        st.finish()
    finally:
        st.close()
    assert isinstance(st.error, DataError)
    msg = str(st.error)
    assert "\n" not in msg and "no prompt ranked by a person" in msg and "1 skipped" in msg
    assert not st.r.rankings.exists() and not list(st.r.feedback.glob("*.pending"))


def test_people_who_rank_no_held_out_prompt_get_one_line_naming_the_pipeline_key(tmp_path, monkeypatch):
    st = Stage(tmp_path, monkeypatch, n=8).start()
    try:
        for p, c in zip(st.ids, st.convs):
            st.judge(p, "skipped" if held_out(c) else "ranked")
        st.finish()
    finally:
        st.close()
    assert isinstance(st.error, DataError)
    msg = str(st.error)
    assert "reward.data.val_every" in msg and not re.search(r"(?<!reward\.)data\.val_every", msg)
    assert "run the same command again" in msg and not st.r.rankings.exists()


def test_round_labels_in_the_api(tmp_path, monkeypatch):
    st = Stage(tmp_path, monkeypatch, n=6, rounds=2).start()
    try:
        first = st.person.get("/api/next").json()["prompt"]
        assert first["id"] == st.ids[0] and first["round"] == {"n": 1, "of": 2}
        again = st.person.get(f"/api/prompt/{st.ids[6]}").json()["prompt"]
        assert again["prompt"] == first["prompt"] and again["round"] == {"n": 2, "of": 2}
    finally:
        st.admin.post("/api/admin/close")
        st.finish()
        st.close()


# ---- a busy port and a server that does not start: one line, at once, nothing written

def busy_socket() -> socket.socket:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    return s


def test_a_busy_port_at_the_rankings_stage_is_one_line_before_anything_is_written(tmp_path, monkeypatch):
    with busy_socket() as s:
        port = s.getsockname()[1]
        st = Stage(tmp_path, monkeypatch, overrides=[f"feedback.port={port}"])
        before = [a.name for a in st.store.annotators()]
        t = time.monotonic()
        with pytest.raises(ConfigError) as e:
            steps.rankings(st.cfg, st.r, True)
        assert time.monotonic() - t < 5
        st.close()
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"feedback.port={port}:") and "in use" in msg
    assert "feedback.port=8001" in msg
    assert [a.name for a in st.store.annotators()] == before and not st.r.rankings.exists()


def test_a_server_that_fails_to_start_is_an_error_not_a_wait(tmp_path, monkeypatch):
    import uvicorn

    def fail(self, sockets=None):
        raise SystemExit(3)

    monkeypatch.setattr(uvicorn.Server, "run", fail)
    st = Stage(tmp_path, monkeypatch)
    t = time.monotonic()
    with pytest.raises(ConfigError, match=r"^feedback\.port=0: the ranking app did not start \(SystemExit: 3\)$"):
        steps.rankings(st.cfg, st.r, True)
    assert time.monotonic() - t < 5
    st.close()


def test_a_server_that_dies_while_people_rank_is_an_error_not_a_wait(tmp_path, monkeypatch):
    st = Stage(tmp_path, monkeypatch).start()
    try:
        st.judge(st.ids[0])
        t = time.monotonic()
        st.r.cleanup.close()  # stops the app (as a crash would) while the stage still waits
        st.finish(timeout=10)
        assert time.monotonic() - t < 10
    finally:
        st.close()
    assert type(st.error).__name__ == "LlmtrainError"
    assert str(st.error).startswith(f"rankings: the ranking app on port {st.ports[0]} stopped;")
    assert not st.r.rankings.exists()


def test_a_server_that_never_comes_up_is_an_error_after_the_timeout(tmp_path, monkeypatch):
    import uvicorn

    release = threading.Event()
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets=None: release.wait(30))
    monkeypatch.setattr(human, "APP_START_TIMEOUT", 0.5)
    st = Stage(tmp_path, monkeypatch)
    t = time.monotonic()
    try:
        with pytest.raises(ConfigError, match="did not start .not up after 0.5 s"):
            steps.rankings(st.cfg, st.r, True)
        assert time.monotonic() - t < 5
    finally:
        release.set()
        st.close()
    assert not st.r.rankings.exists()


# ---- the CLI: bad values for the human path, each one line naming the key as typed

PORT_BUSY = object()
CLI_CASES = [
    # (args after `demo`, the text the one line must hold)
    (["--human", PORT_BUSY], "feedback.port={port}: port {port} on 127.0.0.1 is in use"),
    (["--human", "feedback.port=70000"], "'feedback.port' must be a port number, 0 to 65535 (0: any free port), got 70000"),
    (["--human", "feedback.port=-1"], "'feedback.port' must be a port number, 0 to 65535 (0: any free port), got -1"),
    (["--human", "feedback.port=65536"], "'feedback.port' must be a port number, 0 to 65535 (0: any free port), got 65536"),
    (["--human", "reward.data.val_every=100000"], "reward.data.val_every=100000: none of the 1350 prompts to rank"),
    (["--human", "reward.data.val_every=1"], "command line: 'reward.data.val_every' must be >= 2 (every Nth item is held out), got 1"),
    (["--human", "reward.data.val_every=0"], "command line: 'reward.data.val_every' must be >= 2 (every Nth item is held out), got 0"),
    (["--human", "reward.data.val_every=-3"], "command line: 'reward.data.val_every' must be >= 2 (every Nth item is held out), got -3"),
    (["--human", "feedback.max_prompts=3", "reward.data.val_every=50"], "reward.data.val_every=50: none of the 6 prompts"),
    (["--human", "reward.run.batch_size=100000"], "fewer than one batch of 100000 (reward.run.batch_size)"),
    (["--human", "dpo.run.batch_size=5000"], "fewer than one batch of 5000 (dpo.run.batch_size)"),
    (["--human", "reward.run.batch_size=600", "reward.run.grad_accum=3"],
     "(reward.run.batch_size x reward.run.grad_accum)"),
    (["reward.data.val_every=100000"], "reward.data.val_every=100000: none of"),  # the simulated path too
]


@pytest.mark.parametrize("args,expect", CLI_CASES, ids=lambda x: " ".join(map(str, x)) if isinstance(x, list) else None)
def test_bad_human_path_values_are_one_line_before_anything_runs(tmp_path, capsys, args, expect):
    run_dir = tmp_path / "run"
    with busy_socket() as s:
        port = s.getsockname()[1]
        argv = ["demo", *[f"feedback.port={port}" if a is PORT_BUSY else a for a in args], f"run_dir={run_dir}"]
        t = time.monotonic()
        rc = cli.main(argv)
        took = time.monotonic() - t
    out, err = capsys.readouterr()
    assert rc == 2, (out, err)
    assert err.count("\n") == 1 and err.startswith("llmtrain demo: error: "), err
    assert expect.format(port=port) in err, err
    assert "Traceback" not in out + err
    assert not re.search(r"(?<![a-z.])data\.val_every", err)  # named as typed in `demo`: reward.data.val_every
    if "port" in expect:
        assert "feedback.port" in err
    assert took < 20 and not run_dir.exists()  # at once, and nothing written


def test_busy_port_through_the_real_command_exits_2_at_once(tmp_path):
    run_dir = tmp_path / "run"
    with busy_socket() as s:
        port = s.getsockname()[1]
        t = time.monotonic()
        p = subprocess.run([sys.executable, "-m", "llmtrain", "demo", "--human", f"feedback.port={port}", f"run_dir={run_dir}"],
                           capture_output=True, text=True, timeout=120, cwd=tmp_path, stdin=subprocess.DEVNULL,
                           env={**__import__("os").environ, "PYTHONPATH": str(REPO)})
        took = time.monotonic() - t
    assert p.returncode == 2, p.stderr
    assert p.stderr.splitlines() == [f"llmtrain demo: error: feedback.port={port}: port {port} on 127.0.0.1 is in use by "
                                     "another program; choose another on the command line, e.g. feedback.port=8001"]
    assert "Traceback" not in p.stdout + p.stderr and not run_dir.exists()
    assert took < 60


# ---- the app: the round on the admin page, closing it with the form, the label of round 2

def login(app, token: str) -> tuple[TestClient, str]:
    c = TestClient(app, base_url="http://127.0.0.1:8000")
    nonce = re.search(r'name="csrf" value="([^"]+)"', c.get("/login").text).group(1)
    assert c.post("/login", data={"csrf": nonce, "token": token, "next": "/"}, follow_redirects=False).status_code == 303
    return c, re.search(r'<meta name="csrf-token" content="([^"]+)"', c.get("/").text).group(1)


def test_admin_page_lists_open_prompts_and_its_form_closes_the_round(tmp_path):
    store = FeedbackStore(tmp_path / "f.db")
    ids = [store.add_prompt(f"p{i}", [{"text": "a"}, {"text": "b"}]) for i in range(3)]
    tokens = {n: store.add_annotator(n, is_admin=n == "root") for n in ("ann", "root")}
    store.submit(store.annotator("ann"), ids[0], "skipped", None, "s1")
    store.ensure_annotator("sim-length", simulated=True)
    store.submit(store.annotator("sim-length"), ids[1], "ranked", [[0], [1]], "s2")  # a rule's ranking opens nothing
    app = create_app(str(tmp_path / "f.db"))
    admin, csrf = login(app, tokens["root"])
    page = admin.get("/admin").text
    assert "2 of 3 prompts still open" in page and f"#{ids[1]}, #{ids[2]}" in page and 'id="close-round"' in page
    assert admin.post("/admin/close", data={}, follow_redirects=False).status_code == 403  # no CSRF token
    ann, ann_csrf = login(app, tokens["ann"])
    assert ann.post("/admin/close", data={"csrf": ann_csrf}, follow_redirects=False).status_code == 403  # not an admin
    assert not store.round_closed()
    r = admin.post("/admin/close", data={"csrf": csrf}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/admin" and store.round_closed()
    assert "The round is closed" in admin.get("/admin").text
    nxt = ann.get("/api/next").json()
    assert nxt["closed"] is True and nxt["prompt"] is None


def test_the_rank_page_has_a_place_for_the_round_label(tmp_path):
    store = FeedbackStore(tmp_path / "f.db")
    store.add_prompt("p", [{"text": "a"}, {"text": "b"}])
    app = create_app(str(tmp_path / "f.db"))
    c, _ = login(app, store.add_annotator("ann"))
    page = c.get("/").text
    assert 'id="prompt-round"' in page and 'id="round-note"' in page and 'id="closed"' in page


# ---- the report: how many rankings came from people and how many from a rule

def write_rankings(path: Path, people: int, rule: int) -> None:
    rows = [{"annotator": f"p{i % 2}", "simulated": False} for i in range(people)]
    rows += [{"annotator": "sim-length", "simulated": True} for _ in range(rule)]
    path.write_text("".join(json.dumps(x) + "\n" for x in rows))


@pytest.mark.parametrize("people,rule,says,never", [
    (7, 0, "The rankings: 7 by people (2 annotators, in the browser with `llmtrain demo --human`); none by a rule.",
     "simulated"),
    (0, 5, "The rankings: 5 by a simulated annotator following the rule 'length' (so the demo runs unattended); "
           "none by people", "annotators"),
    (3, 4, "The rankings: 3 by people (2 annotators, in the browser with `llmtrain demo --human`) and 4 by a "
           "simulated annotator following the rule 'length'.", "none by"),
])
def test_the_report_says_where_the_rankings_came_from(tmp_path, people, rule, says, never):
    from types import SimpleNamespace

    from llmtrain.report import headline, ranking_sources, rule_sentence, sources_sentence

    r = pipeline.Run(tmp_path)
    r.feedback.mkdir()
    write_rankings(r.rankings, people, rule)
    src = ranking_sources(r)
    assert (src["people"], src["rule"]) == (people, rule)
    sentence = sources_sentence(src, "length")
    assert sentence == says or sentence.startswith(says)
    assert never not in sentence
    cfg = SimpleNamespace(feedback=SimpleNamespace(rule="length"))
    rows, nums = headline(r, cfg)
    assert ("Rankings learnt from", f"{people} by people, {rule} by a rule") == rows[0][:2]
    assert (nums["rankings_by_people"], nums["rankings_by_rule"]) == (people, rule)
    ruled = rule_sentence(cfg, {}, src)
    assert ruled.startswith("The rankings came from people") if not rule else ruled.startswith("The simulated annotator's")
