"""The human path in a real browser (Debian's Chromium through Playwright): `llmtrain demo
--human` with one Skip runs to the report by itself, an admin closes a round, the ranking page
at 390 px, and the place in the status line after a tie.

Marked `browser` (and the whole-demo test `slow`); skipped only where /usr/bin/chromium is
absent (CI installs it).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.parse

import pytest

from llmtrain.feedback.store import FeedbackStore

from test_human_path import Stage, held_out
from webapp_helpers import REPO, LiveServer, chromium  # noqa: F401  (chromium: a fixture)

pytestmark = pytest.mark.browser

# The demo at its smallest: 6 prompts x 2 rounds x 3 answers to rank, DPO only.
TINY = [
    "methods=[dpo]", "feedback.port=0", "feedback.max_prompts=6", "feedback.rounds=2", "feedback.k=3",
    "feedback.max_new_tokens=8", "feedback.rule=length",
    "pretrain.model.dim=32", "pretrain.model.n_layers=1", "pretrain.model.n_heads=2", "pretrain.model.n_kv_heads=1",
    "pretrain.run.max_steps=6", "pretrain.run.eval_every=6", "pretrain.run.eval_batches=1", "pretrain.run.save_every=6",
    "pretrain.run.batch_size=4", "sft.run.max_steps=4", "sft.run.eval_every=4", "sft.run.batch_size=4",
    "sft.run.eval_batches=1", "sft.sample_tokens=6", "sft.sample_prompts=1", "tokenizer.vocab_size=512",
    "reward.data.val_every=2", "reward.run.max_steps=2", "reward.run.eval_every=2", "reward.run.batch_size=2",
    "reward.norm_prompts=2", "dpo.run.max_steps=2", "dpo.run.eval_every=2", "dpo.run.batch_size=2",
    "evaluate.max_prompts=3", "evaluate.max_new_tokens=6", "style_eval_prompts=3", "sample_prompts=1",
]


@pytest.fixture
def page(chromium):
    ctx = chromium.new_context(viewport={"width": 1280, "height": 900})
    p = ctx.new_page()
    p.set_default_timeout(15_000)
    yield p
    ctx.close()


def login(page, url: str, token: str, next_: str = "/") -> None:
    page.goto(f"{url}/login?next={urllib.parse.quote(next_)}")
    page.fill("#token", token)
    page.click("form button[type=submit]")
    page.wait_for_url(url + next_)


class Lines:
    """A process's stdout, read line by line in a thread."""

    def __init__(self, proc):
        self.lines: list[str] = []
        self.t = threading.Thread(target=self._read, args=(proc,), daemon=True)
        self.t.start()

    def _read(self, proc):
        for line in proc.stdout:
            self.lines.append(line)

    def wait_for(self, pattern: str, proc, timeout: float) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.lines:
                m = re.search(pattern, line)
                if m:
                    return m
            if proc.poll() is not None and not self.t.is_alive():
                break
            time.sleep(0.1)
        raise AssertionError(f"no {pattern!r} in the output:\n{''.join(self.lines)[-3000:]}")

    @property
    def text(self) -> str:
        return "".join(self.lines)


@pytest.mark.slow
def test_demo_human_with_one_skip_runs_to_the_report_by_itself(page, tmp_path):
    run_dir = tmp_path / "run"
    corpus = tmp_path / "corpus.txt"  # the first 300 kB of the demo's corpus: tokenizer and prepare in a blink
    corpus.write_bytes((REPO / "data" / "corpus" / "chitchat.txt").read_bytes()[:300_000].rsplit(b"\n", 1)[0] + b"\n")
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-u", "-m", "llmtrain", "demo", "--human", f"run_dir={run_dir}", *TINY,
                             f"tokenizer.inputs=[{corpus}]", f"prepare.inputs=[{corpus}]"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, cwd=tmp_path)
    out = Lines(proc)
    try:
        url = out.wait_for(r"The ranking app is at (http://127\.0\.0\.1:\d+)/", proc, 180).group(1)
        token = out.wait_for(r"annotator token: (\S+)", proc, 5).group(1)
        store = FeedbackStore(run_dir / "feedback" / "feedback.db")
        ids = store.prompt_ids()
        assert len(ids) == 12
        # Skip a prompt on the training side, so what is ranked still has a held-out prompt.
        skip = next(p for p in ids if not held_out(store.prompt(p)["messages"]))
        login(page, url, token)
        seen_rounds = {}
        for _ in ids:
            page.wait_for_function("() => /^#\\d+$/.test(document.getElementById('prompt-id').textContent)")
            page.locator("#cands > .card").first.wait_for()
            pid = int(page.locator("#prompt-id").text_content()[1:])
            label = page.locator("#prompt-round")
            seen_rounds[pid] = label.text_content() if label.is_visible() else ""
            if seen_rounds[pid] == "round 2 of 2":
                assert page.locator("#round-note").is_visible()
                assert "round 2" in page.locator("#round-note").text_content()
            else:
                assert not page.locator("#round-note").is_visible()
            page.locator("#skip" if pid == skip else "#submit").click()
            page.wait_for_function("id => document.getElementById('prompt-id').textContent !== '#' + id "
                                   "|| !document.getElementById('done').hidden", arg=pid)
        page.locator("#done").wait_for(state="visible")
        assert sorted(seen_rounds) == ids
        assert [seen_rounds[p] for p in ids] == ["round 1 of 2"] * 6 + ["round 2 of 2"] * 6
        assert proc.wait(timeout=240) == 0, out.text[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = out.text
    assert "Traceback" not in text
    assert "still open: #" in text and "12 of 12 prompts judged by people (11 ranked)" in text
    assert "11 exported (11 by people, 0 by the rule" in text and "1 skipped, left out" in text
    rankings = [json.loads(x) for x in (run_dir / "feedback" / "rankings.jsonl").read_text().splitlines()]
    assert len(rankings) == 11 and skip not in {x["source"]["prompt_id"] for x in rankings}
    assert not any(x["simulated"] for x in rankings)
    report = (run_dir / "report.md").read_text()
    assert "The rankings: 11 by people (1 annotator" in report and "none by a rule" in report
    assert "| Rankings learnt from | 11 by people, 0 by a rule |" in report
    assert "simulated one with a stated rule" not in report
    assert json.loads((run_dir / "headline.json").read_text())["rankings_by_people"] == 11


def test_the_admin_closes_the_round_in_the_browser(page, tmp_path, monkeypatch, capsys):
    st = Stage(tmp_path, monkeypatch, n=8).start()
    try:
        held = [p for p, c in zip(st.ids, st.convs) if held_out(c)]
        train = [p for p, c in zip(st.ids, st.convs) if not held_out(c)]
        for pid in (held[0], train[0]):
            st.judge(pid)
        login(page, st.url, st.tokens["boss"], "/admin")
        state = page.locator("#round-state").text_content()
        assert state.startswith("6 of 8 prompts still open")
        assert all(f"#{p}" in state for p in set(st.ids) - {held[0], train[0]})
        time.sleep(1.2)
        assert st.thread.is_alive()  # still waiting for people
        page.locator("#close-round").click()
        page.wait_for_url(st.url + "/admin")
        assert "The round is closed" in page.locator("#round-state").text_content()
        st.finish()
        assert st.error is None, st.error
        assert "an admin closed the round" in capsys.readouterr().out
        got = [json.loads(x) for x in st.r.rankings.read_text().splitlines()]
        assert sorted(x["source"]["prompt_id"] for x in got) == sorted([held[0], train[0]])
        # an annotator who comes back is told the round is over, not given another prompt
        login(page, st.url, st.tokens["person"])
        page.locator("#closed").wait_for(state="visible")
        assert page.locator("#cands").is_hidden()
    finally:
        st.close()


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("human-browser")
    store = FeedbackStore(tmp / "feedback.db")
    long = "a rather long answer that wraps over several lines on a phone screen " * 3
    gid = store.add_generation({"k": 4, "rounds": 2})
    msgs = [{"role": "user", "content": "Which of these answers is best, and why would anyone ask that?"}]
    ids = [store.add_prompt(msgs[0]["content"], [{"text": f"{c}: {long}"} for c in "ABCD"], gid, msgs) for _ in range(2)]
    ids.append(store.add_prompt("Count to four.", [{"text": t} for t in ("1 2 3 4", "one two", "4 3 2 1", "1, 2, 3, 4")]))
    tokens = {"ann": store.add_annotator("annotator-1764531453"), "root": store.add_annotator("admin-1764531453", is_admin=True)}
    server = LiveServer(tmp / "feedback.db", tmp / "server.log").start()
    yield server, store, ids, tokens
    server.stop()
    assert "Traceback" not in (tmp / "server.log").read_text()


def test_the_ranking_page_at_390_px(site, chromium):
    server, store, ids, tokens = site
    ctx = chromium.new_context(viewport={"width": 390, "height": 844}, device_scale_factor=2, is_mobile=True,
                               has_touch=True)
    page = ctx.new_page()
    page.set_default_timeout(15_000)
    try:
        login(page, server.url, tokens["root"], f"/?prompt={ids[1]}")
        page.locator("#cands > .card").first.wait_for()
        assert page.locator("#prompt-round").text_content() == "round 2 of 2"
        for path in (f"/?prompt={ids[1]}", "/mine", "/admin"):
            if path != f"/?prompt={ids[1]}":
                page.goto(server.url + path)
            logout = page.get_by_role("button", name="Log out")
            box = logout.bounding_box()
            assert box is not None and logout.is_visible(), path
            assert 0 <= box["x"] and box["x"] + box["width"] <= 390 and box["y"] >= 0, (path, box)
            sw = page.evaluate("document.documentElement.scrollWidth")
            assert sw <= 390, (path, sw)
            wide = page.evaluate("""() => Array.from(document.querySelectorAll('body *'))
                .filter(e => e.getBoundingClientRect().right > 390.5 && !e.closest('table.grid'))
                .map(e => e.tagName + '.' + e.className)""")
            assert wide == [], (path, wide)
        # the buttons of the page are all within reach
        page.goto(server.url + f"/?prompt={ids[2]}")
        page.locator("#cands > .card").first.wait_for()
        for sel in ("#submit", "#allbad", "#skip", "#cands > .card:last-child button.down"):
            b = page.locator(sel).first.bounding_box()
            assert b is not None and b["x"] >= 0 and b["x"] + b["width"] <= 390, (sel, b)
    finally:
        ctx.close()


def test_after_a_tie_the_status_line_says_the_place_on_the_badge(site, page):
    server, store, ids, tokens = site
    login(page, server.url, tokens["ann"], f"/?prompt={ids[2]}")
    cards = page.locator("#cands > .card")
    cards.first.wait_for()
    cards.nth(1).focus()
    page.keyboard.press("t")  # the second answer tied with the first: both at place 1
    assert page.locator("#status").text_content().endswith("is now at place 1 (tied with answer " +
                                                           cards.nth(0).get_attribute("data-label") + ").")
    cards.nth(3).focus()
    page.keyboard.press("Alt+ArrowUp")  # the last answer moves to the third card: place 2 (after the tie)
    moved = cards.nth(2)
    badge = moved.locator(".pos").text_content()
    status = page.locator("#status").text_content()
    assert badge == "2"
    assert status == f"Answer {moved.get_attribute('data-label')} is now at place 2."
    assert f"place {badge}" in moved.get_attribute("aria-label")
    assert [cards.nth(i).locator(".pos").text_content() for i in range(4)] == ["1", "1", "2", "3"]
    page.keyboard.press("1")  # to the top: place 1, and the tie below it stays
    assert page.locator("#status").text_content().endswith("is now at place 1.")
    assert cards.nth(0).locator(".pos").text_content() == "1"
