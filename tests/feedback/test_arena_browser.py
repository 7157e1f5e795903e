"""The arena page in a real browser (Debian's Chromium through Playwright) against the real server
under uvicorn: the models' names appear only after the vote (in no page and no API answer before
it), a double click and a retried request record one vote, and two annotators see some match
with the sides the other way round, each the same on every reload.

Marked `browser`; skipped only where /usr/bin/chromium is absent (CI installs it).
"""
from __future__ import annotations

import json
import urllib.parse

import pytest

from llmtrain.feedback.store import FeedbackStore

from webapp_helpers import LiveServer, chromium  # noqa: F401  (chromium: a fixture)

pytestmark = pytest.mark.browser

NAMES = ("walrus-13b", "heron-3b")
N_PROMPTS = 10


def answer(model: int, i: int) -> str:
    return f"Answer {i} of the {'first' if model == 0 else 'second'} model."


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("arena-browser")
    store = FeedbackStore(tmp / "feedback.db")
    ids = [store.add_arena_model(n, f"/ckpt/{n}") for n in NAMES]
    for i in range(N_PROMPTS):
        store.add_arena_prompt([{"role": "user", "content": f"Arena question {i}?"}],
                               {m: {"text": answer(j, i)} for j, m in enumerate(ids)})
    tokens = {n: store.add_annotator(n) for n in ("ann", "eve", "bob")}
    server = LiveServer(tmp / "feedback.db", tmp / "server.log").start()
    yield server, store, tokens
    server.stop()


@pytest.fixture
def new_page(chromium):
    contexts = []

    def make():
        ctx = chromium.new_context(viewport={"width": 1280, "height": 900})
        contexts.append(ctx)
        p = ctx.new_page()
        p.set_default_timeout(15_000)
        return p
    yield make
    for ctx in contexts:
        ctx.close()


def login(page, server, token: str, next_: str = "/arena") -> None:
    page.goto(f"{server.url}/login?next={urllib.parse.quote(next_)}")
    page.fill("#token", token)
    page.click("form button[type=submit]")
    page.wait_for_url(server.url + next_)


def wait_match(page, mid: int | None = None) -> int:
    if mid is None:
        page.wait_for_function("() => !!document.getElementById('arena').dataset.shown")
    else:
        page.wait_for_function("id => document.getElementById('arena').dataset.shown === String(id)", arg=mid)
    page.wait_for_function("() => document.getElementById('text-B').textContent.length > 0")
    return int(page.eval_on_selector("#arena", "e => e.dataset.shown"))


def shown_sides(page) -> tuple[str, str]:
    return page.locator("#text-A").text_content(), page.locator("#text-B").text_content()


def model_of(text: str) -> str:
    return NAMES[0] if "first" in text else NAMES[1]


def test_names_only_after_the_vote_and_one_vote_for_a_double_click_and_a_retry(site, new_page):
    server, store, tokens = site
    page = new_page()
    login(page, server, tokens["ann"])
    wait_match(page)
    responses, votes_sent = [], []  # from here on (a body is readable until the page navigates away)
    page.on("response", lambda r: responses.append(r))
    page.on("request", lambda r: votes_sent.append(r.post_data) if r.url.endswith("/api/arena/vote") else None)
    page.reload()
    mid = wait_match(page)
    before = [(r.url, r.text()) for r in responses if r.request.resource_type in ("document", "fetch", "xhr")]
    assert any(u.endswith("/api/arena/next") for u, _ in before) and any(u.endswith("/arena") for u, _ in before)
    for url, body in before + [("page", page.content())]:
        assert not any(n in body for n in NAMES) and "/ckpt/" not in body, url
    assert page.locator("#model-A").is_hidden() and page.locator("#after").is_hidden()
    a_text, b_text = shown_sides(page)

    page.locator("#vote-b").dblclick()  # a double click
    page.locator("#after").wait_for(state="visible")
    assert page.locator("#model-A").text_content() == model_of(a_text)  # the names, on the right sides
    assert page.locator("#model-B").text_content() == model_of(b_text)
    assert model_of(b_text) in page.locator("#reveal").text_content()
    assert page.locator("#side-B.chosen").count() == 1
    assert len(votes_sent) == 1
    retried = page.evaluate("""async body => {  // the same request again, as a retry after a lost answer
        const r = await fetch("/api/arena/vote", {method: "POST", body, headers: {"Content-Type": "application/json",
            "X-CSRF-Token": document.querySelector('meta[name="csrf-token"]').content}});
        return [r.status, await r.json()]; }""", votes_sent[0])
    assert retried[0] == 200 and retried[1]["recorded"] is False and retried[1]["duplicate"] is True
    mine = [v for v in store.arena_votes() if v["annotator"] == "ann"]
    assert [(v["match_id"], v["vote"], v["a"], v["b"]) for v in mine] == \
        [(mid, "b", model_of(a_text), model_of(b_text))]
    assert json.loads(votes_sent[0])["match_id"] == mid

    n_before = len(responses)
    page.click("#next")  # the next match is blind again
    nxt = page.wait_for_function(f"() => document.getElementById('arena').dataset.shown !== '{mid}'")
    assert nxt
    wait_match(page)
    assert page.locator("#model-A").is_hidden() and page.locator("#votes").is_visible()
    for r in responses[n_before:]:
        if r.request.resource_type in ("fetch", "xhr"):
            assert not any(n in r.text() for n in NAMES), r.url
    assert page.locator("#progress").text_content() == f"1 of {N_PROMPTS} matches voted"
    page.keyboard.press("t")  # the keyboard votes too: a tie
    page.locator("#after").wait_for(state="visible")
    assert len([v for v in store.arena_votes() if v["annotator"] == "ann"]) == 2


def test_two_annotators_see_some_match_the_other_way_round(site, new_page):
    server, store, tokens = site
    seen = {}
    for name in ("eve", "bob"):
        page = new_page()
        login(page, server, tokens[name])
        wait_match(page)
        seen[name] = {}
        for mid in range(1, N_PROMPTS + 1):
            page.goto(f"{server.url}/arena?match={mid}")
            wait_match(page, mid)
            seen[name][mid] = shown_sides(page)
        page.reload()  # the same sides after a reload
        wait_match(page, N_PROMPTS)
        assert shown_sides(page) == seen[name][N_PROMPTS]
        page.goto(f"{server.url}/arena?match=1")
        wait_match(page, 1)
        assert shown_sides(page) == seen[name][1]
    swapped = [mid for mid in seen["eve"] if seen["eve"][mid] == seen["bob"][mid][::-1]]
    same = [mid for mid in seen["eve"] if seen["eve"][mid] == seen["bob"][mid]]
    assert swapped and len(swapped) + len(same) == N_PROMPTS, (swapped, same)
    assert {model_of(seen["eve"][m][0]) for m in seen["eve"]} == set(NAMES)  # each model is on side A somewhere
    assert not [v for v in store.arena_votes() if v["annotator"] in ("eve", "bob")]  # looking is not voting
