"""The chat page in a real browser (Debian's Chromium through Playwright) against the real server
and its model worker (a tiny random-weights checkpoint that waits 50 ms after each token, so an
answer of 1,000 tokens takes about a minute unless stopped): the answer streams in and grows over
several updates, Stop stops it on the server, the conversation goes on, text is shown literally;
and while one person's long answer is being generated another person ranks and submits.

Marked `browser`; skipped only where /usr/bin/chromium is absent (CI installs it).
"""
from __future__ import annotations

import re

import pytest

from llmtrain.feedback.modelserver import DELAY_ENV
from llmtrain.feedback.store import FeedbackStore

from webapp_helpers import LiveServer, chromium, login, tiny_checkpoint, wait_prompt  # noqa: F401  (chromium: a fixture)

pytestmark = pytest.mark.browser

XSS = '<img src=x onerror="window.__pwned=1"> hello'
STREAMING = "#log .msg.assistant.streaming"
# Each text the streaming answer shows, recorded as the page changes it.
WATCH = """() => { window.__seen = [];
  new MutationObserver(() => {
    const a = document.querySelector('#log .msg.assistant.streaming .text');
    if (a && a.textContent && window.__seen[window.__seen.length - 1] !== a.textContent) window.__seen.push(a.textContent);
  }).observe(document.getElementById('log'), {subtree: true, childList: true, characterData: true}); }"""


@pytest.fixture(scope="module")
def site(tokenizer_path, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("chat-browser")
    ckpt = tiny_checkpoint(tokenizer_path, tmp / "run", max_seq_len=1100)
    store = FeedbackStore(tmp / "feedback.db")
    ids = [store.add_prompt(f"Say hello number {i}.", [{"text": t} for t in ("Hello!", "Hi.", "Bye.")]) for i in range(3)]
    tokens = {n: store.add_annotator(n) for n in ("ann", "bob")}
    server = LiveServer(tmp / "feedback.db", tmp / "server.log", args=["--model", f"tiny={ckpt}", "--model", f"other={ckpt}"],
                        env={DELAY_ENV: "0.05"}).start(timeout=120)
    yield server, store, ids, tokens
    server.stop()


def new_page(chromium):
    ctx = chromium.new_context(viewport={"width": 1100, "height": 900})
    p = ctx.new_page()
    p.set_default_timeout(30_000)
    return ctx, p


@pytest.fixture
def page(chromium):
    ctx, p = new_page(chromium)
    yield p
    ctx.close()


def send(page, text: str, max_new: int) -> None:
    page.fill("#temperature", "0")
    page.fill("#max-new-tokens", str(max_new))
    page.fill("#input", text)
    page.click("#send")


def test_the_answer_streams_in_and_stop_stops_it(site, page):
    server, _, _, tokens = site
    login(page, server, tokens["ann"], "/chat")
    assert page.locator('nav a[href="/chat"][aria-current=page]').count() == 1
    assert page.locator("#model option").all_text_contents() == ["tiny", "other"]
    page.evaluate(WATCH)
    send(page, XSS, 1000)
    page.wait_for_function("() => window.__seen.length >= 4")  # the text grew over several updates ...
    assert page.locator(STREAMING).count() == 1  # ... before the answer ended
    assert page.locator("#stop").is_enabled() and page.locator("#send").is_disabled()
    page.click("#stop")
    page.wait_for_selector(STREAMING, state="detached")
    stopped = re.fullmatch(r"Stopped after (\d+) tokens\.", page.locator("#status").text_content())
    assert stopped and int(stopped.group(1)) < 1000  # the server's "stopped" event: the worker stopped early
    seen = page.evaluate("window.__seen")
    answer = page.locator("#log .msg.assistant .text").text_content()
    assert all(b.startswith(a) and len(b) > len(a) for a, b in zip(seen, seen[1:]))
    assert answer.startswith(seen[-1])
    # the person's text is shown as text: no element made of it, no script run
    assert page.locator("#log .msg.user .text").text_content() == XSS
    assert page.locator("main img").count() == 0 and page.evaluate("window.__pwned") is None
    assert page.locator("#send").is_enabled() and page.locator("#stop").is_disabled()

    # the conversation goes on: a second turn, answered to its end
    send(page, "And then?", 4)
    page.wait_for_function("() => document.getElementById('status').textContent.startsWith('Done')")
    assert page.locator("#log .msg").count() == 4
    assert page.locator("#log .msg.user .text").all_text_contents() == [XSS, "And then?"]


def test_one_person_chats_while_another_ranks(site, chromium):
    server, store, ids, tokens = site
    ann_ctx, ann = new_page(chromium)
    bob_ctx, bob = new_page(chromium)
    try:
        login(ann, server, tokens["ann"], "/chat")
        send(ann, "Tell me a long story.", 1000)
        ann.wait_for_function("() => document.querySelector('#log .msg.assistant .text').textContent.length > 0")

        login(bob, server, tokens["bob"])  # bob ranks while ann's answer is being generated
        wait_prompt(bob, ids[0])
        bob.click("#submit")
        wait_prompt(bob, ids[1])
        assert bob.locator("#status").text_content() == "Ranking saved."
        assert [(j["annotator"], j["prompt_id"]) for j in store.judgements()] == [("bob", ids[0])]

        assert ann.locator(STREAMING).count() == 1  # still answering all along
        ann.click("#stop")
        ann.wait_for_selector(STREAMING, state="detached")
        assert re.fullmatch(r"Stopped after \d+ tokens\.", ann.locator("#status").text_content())
        assert ann.locator("#log .msg.assistant .text").text_content()
    finally:
        ann_ctx.close()
        bob_ctx.close()
