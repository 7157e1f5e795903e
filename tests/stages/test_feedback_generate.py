"""Candidates: K sampled answers per prompt into the store, settings recorded; then the
simulated annotator and the export, end to end through the CLI."""
import json

from conftest import write_jsonl

from llmtrain.cli import main as cli_main
from llmtrain.data.preference import read_rankings, split_by_prompt
from llmtrain.feedback.store import FeedbackStore


def test_generate_simulate_export(pretrained, tmp_path, capsys):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"Tell me about the garden {i}"} for i in range(5)]
                          + [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]}])
    db = str(tmp_path / "fb.db")
    assert cli_main(["feedback", "generate", str(pretrained), "--prompts", str(prompts), "-k", "3", "--db", db,
                     "--max-new-tokens", "12", "--seed", "5"]) == 0
    store = FeedbackStore(db)
    ids = store.prompt_ids()
    assert len(ids) == 6
    p = store.prompt(ids[-1])
    assert len(p["candidates"]) == 3 and p["messages"][0]["role"] == "system"
    settings = store.generation(p["generation_id"])
    assert settings["k"] == 3 and settings["seed"] == 5 and settings["max_new_tokens"] == 12 and settings["step"] == 30
    assert all(c["n_tokens"] <= 12 for pid in ids for c in store.prompt(pid)["candidates"])
    assert cli_main(["feedback", "simulate", "--db", db, "--rule", "length"]) == 0
    assert cli_main(["feedback", "export", "--db", db, "-o", str(tmp_path / "r.jsonl")]) == 0
    rows, _ = read_rankings(tmp_path / "r.jsonl")
    assert len(rows) == 6 and all(r.simulated for r in rows)
    assert rows[0].source["generation"]["k"] == 3
    # A bad k is one clear error.
    capsys.readouterr()
    assert cli_main(["feedback", "generate", str(pretrained), "--prompts", str(prompts), "-k", "12", "--db", db]) == 2
    assert "k must be between 2 and 9" in capsys.readouterr().err


def test_rounds_answer_each_prompt_again_and_stay_on_one_side_of_the_split(pretrained, tmp_path):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"Tell me about the garden {i}"} for i in range(8)])
    db = str(tmp_path / "fb.db")
    assert cli_main(["feedback", "generate", str(pretrained), "--prompts", str(prompts), "-k", "3", "--rounds", "2",
                     "--db", db, "--max-new-tokens", "10"]) == 0
    store = FeedbackStore(db)
    ids = store.prompt_ids()
    assert len(ids) == 16  # 8 prompts, 2 rankings each
    first, second = store.prompt(ids[0]), store.prompt(ids[8])
    assert first["prompt"] == second["prompt"] and store.generation(first["generation_id"])["rounds"] == 2
    assert [c["text"] for c in first["candidates"]] != [c["text"] for c in second["candidates"]]  # fresh samples
    assert cli_main(["feedback", "simulate", "--db", db, "--rule", "length"]) == 0
    assert cli_main(["feedback", "export", "--db", db, "-o", str(tmp_path / "r.jsonl")]) == 0
    rows, _ = read_rankings(tmp_path / "r.jsonl")
    train, val = split_by_prompt(rows, 3)
    assert len(rows) == 16 and not {r.prompt for r in train} & {r.prompt for r in val}


def test_bad_prompts_file_names_the_line(pretrained, tmp_path, capsys):
    p = tmp_path / "p.jsonl"
    p.write_text(json.dumps({"prompt": "ok"}) + "\n" + json.dumps({"messages": [{"role": "assistant", "content": "x"}]}) + "\n")
    assert cli_main(["feedback", "generate", str(pretrained), "--prompts", str(p), "--db", str(tmp_path / "x.db")]) == 2
    assert "p.jsonl:2: the conversation must end with a user message" in capsys.readouterr().err
