"""The feedback store, agreement, export/import and the simulated annotator (no web app)."""
import json
import math
import sqlite3

import pytest

from llmtrain.data.preference import ranks_from_tiers, read_rankings
from llmtrain.errors import DataError
from llmtrain.feedback import agreement
from llmtrain.feedback.export import export, import_rankings
from llmtrain.feedback.simulate import rank, simulate
from llmtrain.feedback.store import FeedbackStore, StoreError


def make_store(tmp_path, n_prompts=3, k=3):
    store = FeedbackStore(tmp_path / "fb.db")
    for i in range(n_prompts):
        store.add_prompt(f"question {i}?", [{"text": f"answer {i}.{j}"} for j in range(k)])
    return store


def test_agreement_hand_worked():
    a = [[0], [1], [2]]
    b = [[1], [0], [2]]  # swaps the first two: (0,1) discordant, (0,2) and (1,2) concordant
    s = agreement.compare(a, b)
    assert (s["concordant"], s["discordant"]) == (2, 1)
    assert agreement.kendall_tau_b(a, b) == pytest.approx(1 / 3)
    tied = [[0, 1], [2]]  # 2 strict pairs, both concordant with a; tau_b = 2 / sqrt(3 * 2)
    assert agreement.kendall_tau_b(a, tied) == pytest.approx(2 / math.sqrt(6))
    js = [{"prompt_id": 1, "status": "ranked", "annotator": "x", "ranking": a},
          {"prompt_id": 1, "status": "ranked", "annotator": "y", "ranking": b}]
    out = agreement.summarize(js)["pairs"][0]
    assert out["shared_prompts"] == 1 and out["pairwise_agreement"] == pytest.approx(2 / 3)


def test_store_wal_tokens_and_idempotent_submit(tmp_path):
    store = make_store(tmp_path)
    mode = sqlite3.connect(tmp_path / "fb.db").execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"
    token = store.add_annotator("alice")
    raw = sqlite3.connect(tmp_path / "fb.db").execute("SELECT token_hash FROM annotators").fetchone()[0]
    assert token not in raw  # only the hash is stored
    alice = store.annotator_by_token(token)
    assert alice.name == "alice" and store.annotator_by_token("wrong") is None
    pid = store.next_prompt(alice)
    assert store.submit(alice, pid, "ranked", [[2], [0, 1]], "s1") is True
    assert store.submit(alice, pid, "ranked", [[2], [0, 1]], "s1") is False  # a double click
    assert store.submit(alice, pid, "ranked", [[0], [1], [2]], "s2") is False  # one judgement per prompt
    assert len(store.judgements()) == 1 and store.next_prompt(alice) != pid
    assert store.progress(alice) == (1, 3)
    with pytest.raises(StoreError, match="exactly once"):
        store.submit(alice, pid + 1, "ranked", [[0], [0, 1]], "s3")
    with pytest.raises(StoreError, match="no prompt"):
        store.submit(alice, 999, "skipped", None, "s4")
    with pytest.raises(StoreError, match="exists already"):
        store.add_annotator("alice")


def test_export_import_round_trip(tmp_path):
    store = make_store(tmp_path)
    alice = store.annotator_by_token(store.add_annotator("alice"))
    ids = store.prompt_ids()
    store.submit(alice, ids[0], "ranked", [[2], [0, 1]], "a")
    store.submit(alice, ids[1], "skipped", None, "b")
    store.submit(alice, ids[2], "all_bad", None, "c")
    counts = export(store, tmp_path / "r.jsonl")
    assert counts["exported"] == 2 and counts["skipped"] == 1
    rows, _ = read_rankings(tmp_path / "r.jsonl")
    assert rows[0].texts == ["answer 0.2", "answer 0.0", "answer 0.1"] and rows[0].ranks == [1, 2, 2]
    assert rows[0].pairs() == [(0, 1), (0, 2)]  # the tie gives no pair
    assert rows[1].status == "all_bad" and rows[1].pairs() == []
    other = FeedbackStore(tmp_path / "other.db")
    assert import_rankings(other, tmp_path / "r.jsonl") == {"read": 2, "added": 2, "already_there": 0}
    assert import_rankings(other, tmp_path / "r.jsonl")["added"] == 0  # idempotent
    export(other, tmp_path / "r2.jsonl")
    again, _ = read_rankings(tmp_path / "r2.jsonl")
    assert [(r.texts, r.ranks, r.status, r.annotator) for r in again] == [(r.texts, r.ranks, r.status, r.annotator) for r in rows]


def test_cut_off_answers_stay_marked_through_export_and_import(tmp_path):
    store = FeedbackStore(tmp_path / "fb.db")
    store.add_prompt("q?", [{"text": "ends.", "finished": True}, {"text": "cut off at the", "finished": False}])
    alice = store.annotator_by_token(store.add_annotator("alice"))
    store.submit(alice, store.prompt_ids()[0], "ranked", [[1], [0]], "a")
    export(store, tmp_path / "r.jsonl")
    line = json.loads((tmp_path / "r.jsonl").read_text())
    assert [c.get("finished", True) for c in line["ranked"]] == [False, True]
    (r,), _ = read_rankings(tmp_path / "r.jsonl")
    assert r.texts == ["cut off at the", "ends."] and r.finished_flags == [False, True]
    other = FeedbackStore(tmp_path / "other.db")
    import_rankings(other, tmp_path / "r.jsonl")
    assert [c["finished"] for c in other.prompt(other.prompt_ids()[0])["candidates"]] == [False, True]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "q", "ranked": [{"text": "a", "rank": 1, "finished": "no"},
                                                         {"text": "b", "rank": 2}]}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl:1.*finished"):
        read_rankings(bad)


def test_simulated_annotator_uses_the_store_and_is_labelled(tmp_path):
    store = FeedbackStore(tmp_path / "fb.db")
    store.add_prompt("Tell me about tea", [
        {"text": "tea is a drink", "finished": True},
        {"text": "Indeed, tea is splendid, old chap.", "finished": True},
        {"text": "Indeed, tea is splendid, old chap, and", "finished": False},
    ])
    # The subject "tea" is taken up by all three (3 points); the voice adds 1 (not to the
    # first), ending by itself 1 (not to the third): 4, 5, 4.
    assert rank("aristocrat", "Tell me about tea", store.prompt(1)["candidates"]) == [[1], [0, 2]]
    assert rank("markers", "Tell me about tea", store.prompt(1)["candidates"]) == [[1], [2], [0]]
    assert simulate(store, "aristocrat") == {"annotator": "sim-aristocrat", "ranked": 1, "all_equal": 0}
    assert simulate(store, "aristocrat")["ranked"] == 0  # nothing pending
    export(store, tmp_path / "r.jsonl")
    line = json.loads((tmp_path / "r.jsonl").read_text())
    assert line["simulated"] is True and line["annotator"] == "sim-aristocrat"
    assert line["ranked"][0]["text"].startswith("Indeed")
    with pytest.raises(ValueError, match="unknown rule"):
        simulate(store, "vibes")


def test_ranks_from_tiers_and_bad_rankings_file(tmp_path):
    assert ranks_from_tiers([[3], [0, 2], [1]]) == ([3, 0, 2, 1], [1, 2, 2, 4])
    p = tmp_path / "bad.jsonl"
    p.write_text('{"prompt": "q", "ranked": [{"text": "a", "rank": 2}, {"text": "b", "rank": 1}]}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:1: 'ranked' must be listed best first"):
        read_rankings(p)


def test_the_demo_rule_by_hand_and_a_canned_answer_loses():
    from llmtrain.styles import RULES, relevance

    rule = RULES["aristocrat"]
    # "What colour are most humans' eyes": content words colour, most, human (stemmed), eye
    assert relevance("What colour are most humans' eyes?", "Most human eyes, old chap.") == pytest.approx(3 / 4)
    assert rule("What colour are most humans' eyes?", {"text": "Most human eyes are brown, old chap.", "finished": True}) \
        == pytest.approx(3 * 0.75 + 1 + 1)  # colour is not taken up
    long = " ".join(["word"] * 35)
    assert rule("Tea?", {"text": long, "finished": False}) == pytest.approx(-0.1 * 5)
    # One canned, marker-rich sentence loses to answers that take up each question.
    canned = {"text": "How terribly kind of you to ask. Quite so.", "finished": True}
    for q, a in [("Tell me about tea", "Tea, old chap, is splendid."), ("Who wrote Hamlet?", "Indeed, Shakespeare wrote Hamlet.")]:
        assert rule(q, canned) < rule(q, {"text": a, "finished": True})


def test_rankings_stage_rerun_with_another_rule_never_mixes_rules(tmp_path):
    """A rerun of the pipeline's rankings stage ranks again by the rule as it is now and
    exports only that rule's annotator: nothing of an earlier rule is mixed in."""
    store = FeedbackStore(tmp_path / "fb.db")
    store.add_prompt("Tell me about tea", [{"text": "tea is a drink", "finished": True},
                                           {"text": "Indeed, quite so, old chap, splendid.", "finished": True}])
    simulate(store, "length")  # shorter first: candidate 0
    annotator = store.annotator("sim-length")
    store.change(annotator, 1, "ranked", [[1], [0]])  # as an earlier version of the rule would have ranked
    res = simulate(store, "length", redo=True)
    assert res == {"annotator": "sim-length", "ranked": 0, "all_equal": 0, "changed": 1}
    assert store.judgements(annotator)[0]["ranking"] == [[0], [1]]
    simulate(store, "aristocrat")  # another rule in the same database
    person = store.ensure_annotator("alice")
    store.submit(person, 1, "ranked", [[1], [0]], "alice-1")  # a person's ranking is always kept
    counts = export(store, tmp_path / "r.jsonl", only_simulated="sim-length")
    lines = [json.loads(x) for x in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert counts["exported"] == 2 and sorted(x["annotator"] for x in lines) == ["alice", "sim-length"]
    assert [x for x in lines if x["annotator"] == "sim-length"][0]["ranked"][0]["text"] == "tea is a drink"
