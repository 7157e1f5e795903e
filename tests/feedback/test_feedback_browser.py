"""The ranking page in a real browser (Debian's Chromium through Playwright) against the real
server under uvicorn: drag and drop, keyboard, ties, literal model text, refusals, screenshot.

Marked `browser`; skipped only where /usr/bin/chromium is absent (CI installs it). Set
LLMTRAIN_UPDATE_SCREENSHOT=1 to rewrite docs/ranking-page.png from the screenshot test.
"""
from __future__ import annotations

import json
import os
import shutil
import uuid

import pytest

from llmtrain.feedback.store import FeedbackStore

from webapp_helpers import REPO, LiveServer, chromium, login, wait_prompt  # noqa: F401  (chromium: a fixture)

pytestmark = pytest.mark.browser

XSS_SCRIPT = "<script>window.__pwned=1</script>"
XSS_IMG = '<img src=x onerror="window.__pwned=1">'
XSS_PROMPT = f"Repeat after me: {XSS_SCRIPT}"


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A server over a database with four prompts; carol has judged prompt 1 already."""
    tmp = tmp_path_factory.mktemp("browser")
    store = FeedbackStore(tmp / "feedback.db")
    ids = [
        store.add_prompt("Name a primary colour.", [{"text": t} for t in ("Red.", "Green, probably.", "Purple")]),
        store.add_prompt("Count to three.", [{"text": t} for t in ("1, 2, 3", "one two three", "3 2 1", "1 2")]),
        store.add_prompt("Say hello.", [{"text": t} for t in ("Hello!", "Hi there!", "Goodbye.")]),
        store.add_prompt(XSS_PROMPT, [{"text": XSS_SCRIPT}, {"text": XSS_IMG}, {"text": "I will not."}]),
    ]
    tokens = {n: store.add_annotator(n) for n in ("ann", "eve", "bob", "carol")}
    store.submit(store.annotator("carol"), ids[0], "ranked", [[2], [1], [0]], "carol-1")
    server = LiveServer(tmp / "feedback.db", tmp / "server.log").start()
    yield server, store, ids, tokens, tmp
    server.stop()


@pytest.fixture
def page(chromium):
    ctx = chromium.new_context(viewport={"width": 1280, "height": 900})
    p = ctx.new_page()
    p.set_default_timeout(15_000)
    yield p
    ctx.close()


def order(page) -> list[int]:
    return [int(x) for x in page.eval_on_selector_all("#cands > .card", "cs => cs.map(c => c.dataset.idx)")]


def tiers_of(line: dict) -> list[list[int]]:
    by_rank: dict[int, list[int]] = {}
    for i, c in zip(line["source"]["candidate_ids"], line["ranked"]):
        by_rank.setdefault(c["rank"], []).append(i)
    return [sorted(by_rank[r]) for r in sorted(by_rank)]


def test_rank_by_drag_keyboard_and_tie_then_export(site, page):
    server, store, ids, tokens, tmp = site
    login(page, server, tokens["ann"])
    cards = page.locator("#cands > .card")
    expected = {}

    # 1. drag and drop: the last answer onto the top edge of the first
    wait_prompt(page, ids[0])
    assert page.locator("#progress").text_content() == "0 of 4 ranked"
    a, b, c = order(page)
    cards.nth(2).drag_to(cards.nth(0), target_position={"x": 60, "y": 4})
    assert order(page) == [c, a, b]
    assert cards.nth(0).locator(".pos").text_content() == "1"
    expected[ids[0]] = [[c], [a], [b]]
    page.locator("#submit").dblclick()  # a double click records once
    wait_prompt(page, ids[1])
    assert page.locator("#progress").text_content() == "1 of 4 ranked"

    # 2. keyboard only
    a, b, c, d = order(page)
    cards.nth(3).focus()
    page.keyboard.press("Alt+ArrowUp")
    page.keyboard.press("Alt+ArrowUp")  # a d b c
    page.keyboard.press("ArrowDown")  # focus b
    page.keyboard.press("1")  # b a d c
    page.keyboard.press("ArrowDown")  # focus a
    page.keyboard.press("Shift+ArrowDown")  # b d a c
    assert order(page) == [b, d, a, c]
    assert page.evaluate("document.activeElement.dataset.idx") == str(a)
    expected[ids[1]] = [[b], [d], [a], [c]]
    page.keyboard.press("Control+Enter")
    wait_prompt(page, ids[2])

    # 3. a tie: the second answer tied with the first (button); the third tied and untied (key T)
    a, b, c = order(page)
    cards.nth(1).locator("button.tie").click()
    cards.nth(2).focus()
    page.keyboard.press("t")
    assert page.locator("#cands > .card.tied").count() == 2
    page.keyboard.press("t")
    assert page.locator("#cands > .card.tied").count() == 1
    assert cards.nth(1).locator("button.tie").get_attribute("aria-pressed") == "true"
    assert [cards.nth(i).locator(".pos").text_content() for i in range(3)] == ["1", "1", "2"]
    expected[ids[2]] = [sorted([a, b]), [c]]
    page.locator("#submit").click()
    wait_prompt(page, ids[3])
    assert page.locator("#progress").text_content() == "3 of 4 ranked"

    from llmtrain.feedback.export import export

    export(store, tmp / "rankings.jsonl")
    lines = [json.loads(x) for x in (tmp / "rankings.jsonl").read_text().splitlines()]
    mine = {x["source"]["prompt_id"]: x for x in lines if x["annotator"] == "ann"}
    assert sorted(mine) == sorted(expected)  # exactly those three, each once
    assert len([x for x in lines if x["annotator"] == "ann"]) == 3
    for pid, tiers in expected.items():
        assert tiers_of(mine[pid]) == [sorted(t) for t in tiers], pid
        assert mine[pid]["status"] == "ranked"
    texts = {c["idx"]: c["text"] for c in store.prompt(ids[0])["candidates"]}
    assert [r["text"] for r in mine[ids[0]]["ranked"]] == [texts[i] for t in expected[ids[0]] for i in t]


def test_model_text_is_shown_literally_and_runs_nothing(site, page):
    server, store, ids, tokens, _ = site
    dialogs = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    login(page, server, tokens["eve"], f"/?prompt={ids[3]}")
    wait_prompt(page, ids[3])
    assert page.locator("#prompt-text").text_content() == XSS_PROMPT
    texts = page.locator("#cands > .card .text").all_text_contents()
    assert XSS_SCRIPT in texts and XSS_IMG in texts
    assert page.locator("main img, main script, #cands iframe").count() == 0
    first = order(page)
    page.reload()  # the same order after a reload
    wait_prompt(page, ids[3])
    assert order(page) == first
    page.locator("#cands > .card").nth(2).focus()
    page.keyboard.press("1")
    page.locator("#submit").click()
    wait_prompt(page, ids[0])  # eve's next unjudged prompt
    page.goto(server.url + "/mine")  # server-rendered: escaped
    assert page.get_by_text(XSS_PROMPT).count() == 1
    assert page.locator("main img, main script").count() == 0
    assert page.evaluate("typeof window.__pwned") == "undefined"
    assert dialogs == []


def test_requests_without_a_token_or_with_another_annotators_are_refused(site, page, chromium):
    server, store, ids, tokens, _ = site
    page.goto(server.url + "/")
    assert page.url.startswith(server.url + "/login?next=")
    req = page.context.request
    assert req.get(server.url + "/api/next").status == 401
    body = {"prompt_id": ids[0], "status": "all_bad", "ranking": None, "submission_id": str(uuid.uuid4())}
    assert req.post(server.url + "/api/submit", data=body).status == 401

    login(page, server, tokens["bob"])  # carol has judged prompt 1; bob has not
    assert req.get(f"{server.url}/api/judgement/{ids[0]}").status == 404
    change = """async ([pid, withCsrf]) => {
        const h = {"Content-Type": "application/json"};
        if (withCsrf) h["X-CSRF-Token"] = document.querySelector('meta[name="csrf-token"]').content;
        const r = await fetch("/api/change", {method: "POST", headers: h,
                                              body: JSON.stringify({prompt_id: pid, status: "all_bad"})});
        return r.status; }"""
    assert page.evaluate(change, [ids[0], True]) == 404  # not his to change
    assert page.evaluate(change, [ids[0], False]) == 403  # and no CSRF token: refused before anything
    assert req.get(f"{server.url}/api/judgement/{ids[0]}",
                   headers={"Authorization": f"Bearer {tokens['bob']}"}).status == 404
    assert "Name a primary colour" not in page.goto(server.url + "/mine").text()
    carol = [j for j in store.judgements() if j["annotator"] == "carol"]
    assert [(j["prompt_id"], j["status"], j["ranking"]) for j in carol] == [(ids[0], "ranked", [[2], [1], [0]])]


SHOT_PROMPT = ("My sourdough starter smells like nail polish remover. Is it ruined, and what should I do?")
SHOT_CANDIDATES = [
    {"text": "It's not ruined. A nail-polish (acetone) smell means the yeast and bacteria are hungry: they have "
             "eaten the flour and are making acetone-like by-products.\n\nFeed it more often (every 12 hours), or use "
             "a bigger feed such as 1:2:2 starter:flour:water. It should smell sour and yeasty again in a day or two.",
     "n_tokens": 71},
    {"text": "Throw it away and start again, it has gone bad.", "n_tokens": 12},
    {"text": "That smell is normal for a hungry starter. Discard most of it and feed it fresh flour and water; "
             "keep it somewhere warm.", "n_tokens": 27},
    {"text": "Sourdough starters are living cultures of wild yeast and lactic acid bacteria. Over time they develop "
             "complex aromas, and a solvent-like note usually shows that the culture has run out of food, which "
             "happens when the", "n_tokens": 48, "finished": False},
]


def test_screenshot_of_the_ranking_page(chromium, tmp_path):
    store = FeedbackStore(tmp_path / "demo.db")
    first = store.add_prompt(SHOT_PROMPT, SHOT_CANDIDATES)
    for i in range(39):
        store.add_prompt(f"Example prompt {i}", [{"text": f"answer {j}"} for j in range(4)])
    token = store.add_annotator("maria")
    maria = store.annotator("maria")
    for pid in store.prompt_ids()[1:13]:
        store.submit(maria, pid, "ranked", [[0], [1], [2], [3]], f"demo-{pid}")
    server = LiveServer(tmp_path / "demo.db", tmp_path / "server.log").start()
    try:
        ctx = chromium.new_context(viewport={"width": 1280, "height": 860}, device_scale_factor=1)
        page = ctx.new_page()
        login(page, server, token)
        wait_prompt(page, first)
        assert page.locator("#progress").text_content() == "12 of 40 ranked"
        cards = page.locator("#cands > .card")
        labels = cards.locator(".label").all_text_contents()
        best = next(i for i, c in enumerate(order(page)) if c == 0)
        cards.nth(best).focus()
        page.keyboard.press("1")  # the best answer to the top, the runner-up tied below it
        good = next(i for i, c in enumerate(order(page)) if c == 2)
        cards.nth(good).focus()
        page.keyboard.press("2")
        page.keyboard.press("t")
        page.locator("#prompt-h").click()  # focus off the cards for a calm picture
        out = tmp_path / "ranking-page.png"
        page.screenshot(path=str(out), full_page=True)
        assert out.stat().st_size > 20_000 and len(labels) == 4
        if os.environ.get("LLMTRAIN_UPDATE_SCREENSHOT"):
            (REPO / "docs").mkdir(exist_ok=True)
            shutil.copy(out, REPO / "docs" / "ranking-page.png")
        ctx.close()
    finally:
        server.stop()


def test_a_page_open_when_the_admin_closes_the_round_shows_the_closed_panel(page, tmp_path):
    """The round closes while the page shows a prompt: Submit is refused (409), nothing is
    recorded, and the page shows "This round is closed"; so does the edit page afterwards."""
    import httpx

    store = FeedbackStore(tmp_path / "feedback.db")
    ids = [store.add_prompt(f"Prompt {i}.", [{"text": f"answer {i}.{j}"} for j in range(3)]) for i in range(2)]
    ann, boss = store.add_annotator("ann"), store.add_annotator("boss", is_admin=True)
    store.submit(store.annotator("ann"), ids[0], "skipped", None, "ann-1")
    server = LiveServer(tmp_path / "feedback.db", tmp_path / "server.log").start()
    try:
        login(page, server, ann)
        wait_prompt(page, ids[1])
        r = httpx.post(f"{server.url}/api/admin/close", headers={"Authorization": f"Bearer {boss}"})
        assert r.status_code == 200
        page.click("#submit")
        page.locator("#closed").wait_for(state="visible")
        assert page.locator("#done").is_hidden() and page.locator("#cands").is_hidden()
        assert [(j["prompt_id"], j["status"]) for j in store.judgements()] == [(ids[0], "skipped")]
        page.goto(f"{server.url}/?prompt={ids[0]}")
        page.locator("#closed").wait_for(state="visible")
        assert page.locator("#cands").is_hidden()
        log = (tmp_path / "server.log").read_text(errors="replace")
        assert "Traceback" not in log and "ERROR" not in log, log[-3000:]
    finally:
        server.stop()
