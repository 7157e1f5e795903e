"""The chat page's API (issue #18, part 1) against a live server whose model worker serves a tiny
random-weights checkpoint: the streamed tokens are generate()'s greedy answer, a long history is
fitted as `llmtrain chat` fits it, bad parameters are one-line 4xx errors, Stop ends an answer
early and frees the worker, a full queue is 503, and a worker that dies is one line and comes back.
Without --model there is no chat page at all. (The browser side: test_chat_browser.py.)
"""
from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
import json
import os
import re
import signal
import time
from types import SimpleNamespace

import httpx
import pytest
from starlette.testclient import TestClient

from llmtrain.feedback.app import create_app
from llmtrain.feedback.chatapi import answer_events, chat_request
from llmtrain.feedback.modelserver import DELAY_ENV, END, ModelServer
from llmtrain.feedback.store import FeedbackStore

from webapp_helpers import LiveServer, tiny_checkpoint, worker_pids

LONG = 400  # tokens of an answer that is stopped long before its end (the worker waits 20 ms a token)


@pytest.fixture(scope="module")
def ckpt(tokenizer_path, tmp_path_factory):
    return tiny_checkpoint(tokenizer_path, tmp_path_factory.mktemp("chat-model") / "run")


@pytest.fixture(scope="module")
def live(ckpt, tmp_path_factory):
    """A server with one chat model, at most one answer at a time, 20 ms per token."""
    tmp = tmp_path_factory.mktemp("chat-api")
    store = FeedbackStore(tmp / "feedback.db")
    store.add_prompt("Say hi.", [{"text": "hi"}, {"text": "hello"}])
    tokens = {n: store.add_annotator(n) for n in ("ann", "bob")}
    server = LiveServer(tmp / "feedback.db", tmp / "server.log", args=["--model", f"tiny={ckpt}", "--chat-jobs", "1"],
                        env={DELAY_ENV: "0.02"}).start(timeout=120)
    yield SimpleNamespace(server=server, tokens=tokens, ckpt=ckpt, log=tmp / "server.log")
    server.stop()


def client(live, who: str = "ann") -> httpx.Client:
    return httpx.Client(base_url=live.server.url, timeout=60, headers={"Authorization": f"Bearer {live.tokens[who]}"})


def chat(**over) -> dict:
    return {"model": "tiny", "messages": [{"role": "user", "content": "Hello there"}], "temperature": 0,
            "max_new_tokens": 12, **over}


def events(response):
    """(event, data) of each server-sent event of a streamed response."""
    ev = None
    for line in response.iter_lines():
        if line.startswith("event: "):
            ev = line[7:]
        elif line.startswith("data: "):
            yield ev, json.loads(line[6:])


def until_end(it) -> tuple[str, dict]:
    for ev, d in it:
        if ev in ("done", "stopped", "error"):
            return ev, d
    raise AssertionError("the stream ended without a last event")


def greedy(ckpt, messages: list[dict], max_new: int) -> tuple[str, int, int]:
    """generate()'s greedy answer with the history fitted as `llmtrain chat` fits it:
    (text, tokens generated, messages dropped)."""
    from llmtrain.conversation import fit_history, load_chat_model
    from llmtrain.generate import SamplingConfig, generate, prompt_budget

    tok, model = load_chat_model(str(ckpt), "cpu")
    fit = fit_history(tok, messages, prompt_budget(model.config.max_seq_len, max_new))
    out = generate(model, [fit.ids], SamplingConfig(max_new, 0.0, stop_ids=tok.stop_ids), pad_id=tok.pad_id)[0]
    finished = bool(out) and out[-1] in tok.stop_ids
    return tok.decode(out[:-1] if finished else out, skip_special=True), len(out), fit.dropped


CONVS = {
    "one turn": [{"role": "user", "content": "Hello there"}],
    "three turns": [{"role": "user", "content": "Hello there"}, {"role": "assistant", "content": "Hi! How are you?"},
                    {"role": "user", "content": "Tell me about the garden."}],
    "too long for the window": [{"role": "user" if i % 2 == 0 else "assistant",
                                 "content": f"Message {i}: " + "the apple by the river and the candle " * 5}
                                for i in range(7)],
}


@pytest.mark.parametrize("conv", list(CONVS))
def test_the_stream_is_the_greedy_answer_of_generate(live, conv):
    expected, n, dropped = greedy(live.ckpt, CONVS[conv], 24)  # in this process, not the worker
    with client(live) as c, c.stream("POST", "/api/chat", json=chat(messages=CONVS[conv], max_new_tokens=24)) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        evs = list(events(r))
    kinds = [e for e, _ in evs]
    assert kinds[:2] == ["queued", "start"] and kinds[-1] == "done" and set(kinds[2:-1]) == {"token"}
    assert evs[1][1]["dropped"] == dropped and (dropped > 0) == (conv == "too long for the window")
    tokens = [d["text"] for e, d in evs if e == "token"]
    assert len(tokens) > 3 and "".join(tokens) == expected == evs[-1][1]["text"]
    assert evs[-1][1]["n_tokens"] == n


def test_torch_is_loaded_in_the_worker_only(live):
    """The app's process never loads torch (a long answer cannot hold up the ranking pages through
    the GIL or the CPU threads of torch); the worker does."""
    with client(live) as c, c.stream("POST", "/api/chat", json=chat(max_new_tokens=2)) as r:
        assert until_end(events(r))[0] == "done"
    (worker,) = worker_pids(live.server.proc.pid)
    assert "libtorch" in open(f"/proc/{worker}/maps").read()
    assert "libtorch" not in open(f"/proc/{live.server.proc.pid}/maps").read()


@pytest.mark.parametrize("over, needle", [
    ({"temperature": 2.5}, "temperature must be a number from 0 (greedy) to 2, not 2.5"),
    ({"temperature": -0.1}, "temperature must be"),
    ({"temperature": "hot"}, "temperature must be"),
    ({"temperature": True}, "temperature must be"),
    ({"top_p": 0}, "top_p must be a number above 0 and at most 1, not 0"),
    ({"top_p": 1.5}, "top_p must be"),
    ({"max_new_tokens": 0}, "max_new_tokens must be a whole number from 1 to 1024, not 0"),
    ({"max_new_tokens": 1025}, "max_new_tokens must be"),
    ({"max_new_tokens": 2.5}, "max_new_tokens must be"),
    ({"model": "nope"}, "model must be one of tiny, not nope"),
    ({"messages": []}, "messages must be a list of 1 to 200"),
    ({"messages": [{"role": "assistant", "content": "hi"}]}, "the last message must be the user's"),
    ({"messages": [{"role": "system", "content": "x"}, {"role": "user", "content": "hi"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content must be a string"),
    ({"messages": [{"role": "user", "content": "hi", "name": "x"}]}, "messages[0] must be an object"),
    ({"seed": 1}, "unknown field seed (the fields are model, messages"),
])
def test_bad_parameters_are_one_line_400s(live, over, needle):
    with client(live) as c:
        r = c.post("/api/chat", json=chat(**over))
    assert r.status_code == 400 and r.headers["content-type"] == "application/json"
    msg = r.json()["error"]
    assert needle in msg and "\n" not in msg


def test_other_refusals_are_one_line(live):
    with client(live) as c:
        assert c.post("/api/chat", content=b"x", headers={"Content-Type": "text/plain"}).status_code == 415
        big = c.post("/api/chat", json=chat(messages=[{"role": "user", "content": "x" * 70_000}]))
        assert big.status_code == 413 and "\n" not in big.json()["error"]
        assert c.post("/api/chat", content=b"{\"model\": ", headers={"Content-Type": "application/json"}).status_code == 400
        assert c.post("/api/chat/nothing-here/stop").status_code == 404
    anon = httpx.post(live.server.url + "/api/chat", json=chat())
    assert anon.status_code == 401 and "token is required" in anon.json()["error"]
    page = httpx.get(live.server.url + "/chat", follow_redirects=False)
    assert page.status_code == 303 and page.headers["location"].startswith("/login?next=%2Fchat")


def test_stop_ends_the_answer_early_and_frees_the_worker(live):
    with client(live) as c, client(live, "bob") as bob, client(live) as again:
        with c.stream("POST", "/api/chat", json=chat(max_new_tokens=LONG)) as r:
            it = events(r)
            ev, queued = next(it)
            assert ev == "queued" and queued["ahead"] == 0
            got = []
            for ev, d in it:
                if ev == "token":
                    got.append(d["text"])
                if len(got) == 3:
                    break
            # only the annotator who asked may stop an answer
            assert bob.post(f"/api/chat/{queued['id']}/stop").status_code == 404
            s = again.post(f"/api/chat/{queued['id']}/stop")
            assert s.status_code == 200 and s.json() == {"ok": True, "stopping": True}
            rest = list(it)
        assert rest[-1][0] == "stopped" and {e for e, _ in rest[:-1]} <= {"token"}
        last = rest[-1][1]
        assert last["n_tokens"] < LONG and last["text"] == "".join(got + [d["text"] for e, d in rest[:-1]])
        # the worker is free: with --chat-jobs 1 the next request is taken and answered at once
        with c.stream("POST", "/api/chat", json=chat(max_new_tokens=3)) as r:
            evs = list(events(r))
        assert evs[0] == ("queued", {"id": evs[0][1]["id"], "ahead": 0}) and evs[-1][0] == "done"


def test_a_full_queue_is_503_with_retry_after_and_a_client_that_leaves_frees_its_place(live):
    with client(live) as c, client(live, "bob") as bob:
        with c.stream("POST", "/api/chat", json=chat(max_new_tokens=LONG)) as r:
            it = events(r)
            next(it)
            assert next(it)[0] == "start"
            busy = bob.post("/api/chat", json=chat())
            assert busy.status_code == 503 and busy.headers["retry-after"] == "2"
            assert "busy" in busy.json()["error"] and "\n" not in busy.json()["error"]
        # leaving the stream (a closed tab) ends the answer: the worker takes new requests again
        for _ in range(100):
            with bob.stream("POST", "/api/chat", json=chat(max_new_tokens=2)) as r2:
                if r2.status_code == 200:
                    assert until_end(events(r2))[0] == "done"
                    break
                r2.read()
                assert r2.status_code == 503
            time.sleep(0.1)
        else:
            raise AssertionError("the worker did not become free after the client left")


def test_a_page_that_goes_away_stops_its_answer_in_the_worker(ckpt, monkeypatch):
    """Starlette cancels the stream when the client disconnects; the stream's generator then tells
    the worker to stop, and the worker ends the answer early ("stopped", not "done")."""
    monkeypatch.setenv(DELAY_ENV, "0.02")
    server = ModelServer({"tiny": str(ckpt)}, max_jobs=1).start()

    async def scenario():
        job = await server.submit(1, chat_request(chat(max_new_tokens=LONG), ["tiny"]))
        tokens = asyncio.Event()

        async def page():  # reads the stream as the response would, until it is cancelled
            n = 0
            async for chunk in answer_events(server, job):
                n += chunk.startswith(b"event: token")
                if n == 3:
                    tokens.set()
        reading = asyncio.create_task(page())
        await tokens.wait()
        reading.cancel()  # the client went away
        await asyncio.gather(reading, return_exceptions=True)
        while (ev := await asyncio.wait_for(job.events.get(), 60))["event"] not in END:
            pass
        return ev
    try:  # in a thread of its own: a browser test's Playwright may hold this thread's event loop
        with ThreadPoolExecutor(1) as pool:
            ev = pool.submit(asyncio.run, scenario()).result()
    finally:
        server.close()
    assert ev["event"] == "stopped" and 3 <= ev["n_tokens"] < LONG


def test_a_worker_that_dies_is_one_line_and_the_next_request_restarts_it(live):
    with client(live) as c:
        with c.stream("POST", "/api/chat", json=chat(max_new_tokens=LONG)) as r:
            it = events(r)
            assert next(it)[0] == "queued" and next(it)[0] == "start"
            (pid,) = worker_pids(live.server.proc.pid)
            os.kill(pid, signal.SIGKILL)
            ev, d = until_end(it)
        assert ev == "error" and re.fullmatch(r"the model worker stopped \(signal 9\); send again to restart it", d["error"])
        with c.stream("POST", "/api/chat", json=chat(max_new_tokens=3)) as r:
            assert r.status_code == 200 and until_end(events(r))[0] == "done"
        assert worker_pids(live.server.proc.pid) not in ([], [pid])


# ---- without a running worker (Starlette's TestClient): routes, nav, CSRF

BASE = "http://127.0.0.1:8000"


def app_env(tmp_path, models: bool):
    store = FeedbackStore(tmp_path / "feedback.db")
    token = store.add_annotator("ann")
    server = ModelServer({"tiny": str(tmp_path)}) if models else None  # never started: nothing here reaches it
    return TestClient(create_app(str(tmp_path / "feedback.db"), models=server), base_url=BASE), token


def sign_in(c: TestClient, token: str) -> str:
    nonce = re.search(r'name="csrf" value="([^"]+)"', c.get("/login").text).group(1)
    assert c.post("/login", data={"csrf": nonce, "token": token, "next": "/"}, follow_redirects=False).status_code == 303
    return re.search(r'<meta name="csrf-token" content="([^"]+)"', c.get("/").text).group(1)


def test_without_models_there_is_no_chat_page_and_no_nav_link(tmp_path):
    c, token = app_env(tmp_path, models=False)
    sign_in(c, token)
    assert 'href="/chat"' not in c.get("/").text
    assert c.get("/chat").status_code == 404
    assert c.post("/api/chat", json=chat()).status_code == 404


def test_with_models_the_nav_links_the_chat_page_and_writes_need_csrf(tmp_path):
    c, token = app_env(tmp_path, models=True)
    csrf = sign_in(c, token)
    assert 'href="/chat"' in c.get("/").text and 'href="/chat"' in c.get("/mine").text
    page = c.get("/chat")
    assert page.status_code == 200 and '<option value="tiny">tiny</option>' in page.text
    assert "/static/chat.js" in page.text and "<script>" not in page.text
    assert "script-src 'self'" in page.headers["content-security-policy"]
    for url in ("/api/chat", "/api/chat/abc/stop"):
        r = c.post(url, json=chat())  # a cookie write without the CSRF token
        assert r.status_code == 403 and r.json()["csrf"] is True
    bad = c.post("/api/chat", json=chat(top_p=2), headers={"X-CSRF-Token": csrf})
    assert bad.status_code == 400 and "top_p" in bad.json()["error"]
    assert c.post("/api/chat/abc/stop", headers={"X-CSRF-Token": csrf}).status_code == 404


def test_the_arena_answers_a_persons_own_prompt_through_the_chat_worker(ckpt, tmp_path):
    """`feedback serve --model NAME=CKPT` also answers the arena's own prompts: each arena model by
    the served model of its name, greedily; the match is that person's own, with two answers
    equal to generate()'s greedy answer and no model name shown before the vote."""
    store = FeedbackStore(tmp_path / "feedback.db")
    store.add_arena_model("left", str(ckpt))
    store.add_arena_model("right", str(ckpt))
    token = store.add_annotator("ann")
    server = LiveServer(tmp_path / "feedback.db", tmp_path / "server.log",
                        args=["--model", f"left={ckpt}", "--model", f"right={ckpt}"]).start(timeout=120)
    try:
        with httpx.Client(base_url=server.url, timeout=120, headers={"Authorization": f"Bearer {token}"}) as c:
            r = c.post("/api/arena/ask", json={"prompt": "Hello there"})
            assert r.status_code == 200, r.text
            match = r.json()["match"]
            assert match["own"] and match["prompt"] == "Hello there"
            expected, n, _ = greedy(ckpt, [{"role": "user", "content": "Hello there"}], 48)
            assert [a["text"] for a in match["answers"]] == [expected, expected]
            assert all(set(a) == {"side", "text", "finished", "n_tokens"} for a in match["answers"])  # no names
            assert not {"model", "models", "name", "names"} & set(match)
    finally:
        server.stop()
