"""The arena's tables (feedback/arena_store.py), its simulated voter and its export, without the
web app: schema migration, sides per annotator, exactly-once votes, and the export read by the
reward stage's reader as rankings of two answers."""
from __future__ import annotations

import json
import sqlite3

import pytest

from llmtrain.config import RewardDataConfig
from llmtrain.data.preference import load_pairs_data, read_rankings
from llmtrain.feedback.arena_store import arena_sides
from llmtrain.feedback.export import export_arena
from llmtrain.feedback.simulate import arena_choice, arena_simulate
from llmtrain.feedback.store import SCHEMA_VERSION, FeedbackStore, StoreError

MODELS = ("zebra", "okapi", "lemur")


def arena(tmp_path, n_prompts: int = 4, models=MODELS) -> tuple[FeedbackStore, dict, list[int]]:
    """n prompts answered by each model: the answer of model m to prompt i is 'm ... i' padded
    to a length that orders the models (zebra shortest)."""
    store = FeedbackStore(tmp_path / "fb.db")
    ids = {m: store.add_arena_model(m, f"/ckpt/{m}") for m in models}
    mids = []
    for i in range(n_prompts):
        answers = {ids[m]: {"text": " ".join(["word"] * (j + 1)) + f" {i}", "finished": j != 2}
                   for j, m in enumerate(models)}
        mids += store.add_arena_prompt([{"role": "user", "content": f"Question {i}?"}], answers)[1]
    return store, ids, mids


def test_a_version_2_database_gains_the_arena_tables(tmp_path):
    store = FeedbackStore(tmp_path / "fb.db")
    pid = store.add_prompt("q", [{"text": "a"}, {"text": "b"}])
    store.close()
    con = sqlite3.connect(tmp_path / "fb.db")  # as llmtrain before the arena left it
    for t in ("arena_votes", "arena_matches", "arena_answers", "arena_prompts", "arena_models"):
        con.execute(f"DROP TABLE {t}")
    con.execute("UPDATE meta SET value='2' WHERE key='schema_version'")
    con.commit()
    con.close()
    store = FeedbackStore(tmp_path / "fb.db")
    assert SCHEMA_VERSION == 3
    assert store._con().execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0] == "3"
    assert store.prompt(pid)["candidates"][1]["text"] == "b" and store.arena_counts()["matches"] == 0
    mid = store.add_arena_model("m", "/c")
    assert store.arena_models() == [{"id": mid, "name": "m", "checkpoint": "/c"}]
    store._con().execute("UPDATE meta SET value='4' WHERE key='schema_version'")
    with pytest.raises(StoreError, match="schema version 4, this llmtrain reads version 3"):
        FeedbackStore(tmp_path / "fb.db")


def test_matches_pairs_and_sides(tmp_path):
    store, ids, mids = arena(tmp_path, n_prompts=12)
    assert store.arena_counts() == {"models": 3, "prompts": 12, "matches": 36, "votes": 0}
    pairs = {(store.arena_match(i)["x"]["name"], store.arena_match(i)["y"]["name"]) for i in mids}
    assert pairs == {("zebra", "okapi"), ("zebra", "lemur"), ("okapi", "lemur")}  # x < y by model id
    # Sides: a coin per (annotator, prompt, pair), the same every time, not the same for everyone
    flips = [arena_sides(a, p, 1, 2) for a in (1, 2) for p in range(1, 40)]
    assert flips == [arena_sides(a, p, 1, 2) for a in (1, 2) for p in range(1, 40)]
    assert {f for f in flips} == {(1, 2), (2, 1)}
    assert [arena_sides(1, p, 1, 2) for p in range(1, 40)] != [arena_sides(2, p, 1, 2) for p in range(1, 40)]
    with pytest.raises(StoreError, match="another name"):
        store.add_arena_model("zebra", "/elsewhere")
    assert store.add_arena_model("zebra", "/ckpt/zebra") == ids["zebra"]
    with pytest.raises(StoreError, match="model names are 1-64"):
        store.add_arena_model("no spaces", "/c")


def test_a_vote_is_recorded_once_with_the_sides_its_voter_saw(tmp_path):
    store, ids, mids = arena(tmp_path)
    store.add_annotator("ann")
    ann = store.annotator("ann")
    mid = store.arena_next(ann)
    assert mid == store.arena_next(ann)  # the same match until it is voted on
    m = store.arena_match(mid)
    assert store.arena_vote(ann, mid, m["prompt_id"], "a", "s-1") is True
    assert store.arena_vote(ann, mid, m["prompt_id"], "a", "s-1") is False  # a retry
    assert store.arena_vote(ann, mid, m["prompt_id"], "b", "s-2") is False  # a second vote on the match
    a, b = arena_sides(ann.id, m["prompt_id"], m["x"]["id"], m["y"]["id"])
    names = {m["x"]["id"]: m["x"]["name"], m["y"]["id"]: m["y"]["name"]}
    mine = store.arena_my_vote(ann, mid)
    assert mine["vote"] == "a" and mine["reveal"] == {"A": names[a], "B": names[b]}
    assert [(v["a"], v["b"], v["vote"]) for v in store.arena_votes()] == [(names[a], names[b], "a")]
    other = next(i for i in mids if store.arena_match(i)["prompt_id"] != m["prompt_id"])
    with pytest.raises(StoreError, match="belongs to another vote"):
        store.arena_vote(ann, other, store.arena_match(other)["prompt_id"], "a", "s-1")
    with pytest.raises(StoreError, match=f"is of prompt {store.arena_match(other)['prompt_id']}, not of prompt"):
        store.arena_vote(ann, other, m["prompt_id"], "a", "s-3")
    with pytest.raises(StoreError, match="vote must be one of a, b, tie, both_bad"):
        store.arena_vote(ann, other, store.arena_match(other)["prompt_id"], "A", "s-4")
    assert store.arena_counts()["votes"] == 1 and store.arena_progress(ann) == {"voted": 1, "total": 12}
    assert store.arena_next(ann) != mid


def test_a_persons_own_prompt_is_theirs_alone(tmp_path):
    store, ids, _ = arena(tmp_path, n_prompts=1)
    for n in ("ann", "bob"):
        store.add_annotator(n)
    ann, bob = store.annotator("ann"), store.annotator("bob")
    pid, own = store.add_arena_prompt([{"role": "user", "content": "Mine?"}],
                                      {i: {"text": f"t{i}"} for i in ids.values()}, owner=ann)
    assert store.arena_progress(ann)["total"] == 6 and store.arena_progress(bob)["total"] == 3
    assert store.arena_visible(ann, store.arena_match(own[0])) and not store.arena_visible(bob, store.arena_match(own[0]))
    with pytest.raises(StoreError, match=f"no arena match with id {own[0]}"):
        store.arena_vote(bob, own[0], pid, "a", "bob-1")
    while (mid := store.arena_next(bob)) is not None:
        assert mid not in own
        store.arena_vote(bob, mid, store.arena_match(mid)["prompt_id"], "tie", f"bob-{mid}")
    assert store.arena_progress(bob) == {"voted": 3, "total": 3}


def test_the_simulated_voter_votes_by_the_rule_blind_and_marked(tmp_path):
    store, ids, mids = arena(tmp_path, n_prompts=3)
    assert arena_choice("length", "q", {"text": "a b"}, {"text": "a"}) == "b"
    assert arena_choice("length", "q", {"text": "a"}, {"text": "b"}) == "tie"
    r = arena_simulate(store, "length", limit=4)
    assert r == {"annotator": "sim-length", "voted": 4, "a": r["a"], "b": r["b"], "tie": 0}
    r = arena_simulate(store, "length")
    assert r["voted"] == 5 and store.arena_next(store.annotator("sim-length")) is None
    votes = store.arena_votes()
    assert len(votes) == 9 and all(v["simulated"] for v in votes)
    rank = {m: j for j, m in enumerate(MODELS)}  # 'length' prefers fewer words: zebra > okapi > lemur
    for v in votes:
        winner = v["a"] if v["vote"] == "a" else v["b"]
        assert winner == min((v["a"], v["b"]), key=rank.get)
    store.add_annotator("person")
    with pytest.raises(ValueError, match="a person"):
        arena_simulate(store, "length", name="person")
    with pytest.raises(ValueError, match="unknown rule"):
        arena_simulate(store, "nope")


def test_export_is_read_by_the_reward_stages_reader_as_rankings_of_two(tmp_path):
    store, ids, mids = arena(tmp_path, n_prompts=8)
    arena_simulate(store, "length")  # 24 preferences (the three answers differ in length)
    store.add_annotator("ann")
    ann = store.annotator("ann")
    kinds = ["tie", "both_bad", "a", "b"]
    for k, mid in enumerate(mids[:4]):
        store.arena_vote(ann, mid, store.arena_match(mid)["prompt_id"], kinds[k], f"ann-{mid}")
    out = tmp_path / "arena.jsonl"
    c = export_arena(store, out)
    assert c == {"votes": 28, "preferences": 26, "ties": 1, "both_bad": 1, "simulated": 24}
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    mine = {x["source"]["match_id"]: x for x in lines if x["annotator"] == "ann"}
    for k, mid in enumerate(mids[:4]):
        x, m, v = mine[mid], store.arena_match(mid), store.arena_my_vote(ann, mid)
        assert x["source"]["kind"] == "arena" and x["source"]["vote"] == kinds[k] and x["simulated"] is False
        assert x["source"]["sides"] == v["reveal"] and x["prompt"] == m["prompt"]
        texts = {m["x"]["name"]: m["x"]["text"], m["y"]["name"]: m["y"]["text"]}
        assert [r["text"] for r in x["ranked"]] == [texts[n] for n in x["source"]["models"]]
        win = {"a": v["reveal"]["A"], "b": v["reveal"]["B"]}.get(kinds[k])
        if win:
            assert x["source"]["models"][0] == win and [r["rank"] for r in x["ranked"]] == [1, 2]
            assert x["status"] == "ranked"
        else:  # a tie: one tier of two; both bad: not a preference (status all_bad)
            assert [r["rank"] for r in x["ranked"]] == [1, 1]
            assert x["status"] == ("ranked" if kinds[k] == "tie" else "all_bad")
    rankings, bad = read_rankings(out)
    assert bad == 0 and len(rankings) == 28 and all(len(r.texts) == 2 for r in rankings)
    assert sum(len(r.pairs()) for r in rankings) == 26
    train, val, counts = load_pairs_data(RewardDataConfig(train=str(out), val_every=2))
    assert len(train) + len(val) == 26 and counts["without_pairs"] == 2
    assert all(len(r.texts) == 2 and len(r.pairs()) == 1 for r in train + val)
    c = export_arena(store, out, include_simulated=False)
    assert c["votes"] == 4 and all(not json.loads(x)["simulated"] for x in out.read_text().splitlines())
