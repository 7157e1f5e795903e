"""Data sources (issue #17, Build 2): every data kind reads JSONL, JSON, Parquet, CSV, a folder,
a dataset saved by `datasets` and a Hub dataset from the offline cache, with a column map; and
the published record formats (TRL prompt-completion and prompt/chosen/rejected, UltraFeedback
binarized, Anthropic HH-RLHF). All data is built here; nothing is downloaded."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from llmtrain.data import classify
from llmtrain.data.preference import read_rankings
from llmtrain.data.prompts import read_prompts
from llmtrain.data.sft import read_conversations
from llmtrain.data.sources import read_records
from llmtrain.errors import DataError

datasets = pytest.importorskip("datasets")  # the `hub` extra (and `dev`)

REPO = Path(__file__).resolve().parents[2]
U = lambda text: {"role": "user", "content": text}  # noqa: E731
A = lambda text: {"role": "assistant", "content": text}  # noqa: E731


def hh_rows():
    """Anthropic HH-RLHF's shape: only chosen and rejected, two transcripts sharing all but the last answer."""
    talk = "\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?\n\nHuman: Name a fruit."
    return [{"chosen": talk + "\n\nAssistant: An apple.", "rejected": talk + "\n\nAssistant: No."},
            {"chosen": "\n\nHuman: Say yes.\n\nAssistant: Yes.", "rejected": "\n\nHuman: Say yes.\n\nAssistant: Never"}]


def ultrafeedback_rows():
    """UltraFeedback binarized's shape: prompt a string, chosen/rejected message lists that repeat it."""
    rows = []
    for i, (good, bad) in enumerate([("Paris.", "Rome."), ("Four.", "Five.")]):
        q = ["What is the capital of France?", "What is 2 + 2?"][i]
        rows.append({"prompt": q, "prompt_id": f"id{i}", "chosen": [U(q), A(good)], "rejected": [U(q), A(bad)],
                     "messages": [U(q), A(good)], "score_chosen": 9.0, "score_rejected": 3.0 + i})
    return rows


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_parquet(path, rows):
    datasets.Dataset.from_list(rows).to_parquet(str(path))
    return path


# ----------------------------------------------------------------------------- preference formats

def test_hh_rlhf_transcripts_are_rankings_of_two(tmp_path):
    (first, second), skipped = read_rankings(write_jsonl(tmp_path / "hh.jsonl", hh_rows()))
    assert skipped == 0
    assert first.messages == [U("Hi there"), A("Hello! How can I help?"), U("Name a fruit.")]
    assert first.texts == ["An apple.", "No."] and first.ranks == [1, 2] and first.pairs() == [(0, 1)]
    assert first.source == {"format": "hh-rlhf"} and first.scores is None
    assert first.where == f"{tmp_path / 'hh.jsonl'}:1"
    assert second.messages == [U("Say yes.")] and second.texts == ["Yes.", "Never"]
    assert read_prompts(tmp_path / "hh.jsonl") == [first.messages, second.messages]  # the shared prompt
    # The prompt is what they share: a pair whose conversations differ before the answer is refused.
    bad = write_jsonl(tmp_path / "bad.jsonl", [hh_rows()[1],
                                               {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: c\n\nAssistant: d"},
                                               {"chosen": "just text", "rejected": "more text"}])
    with pytest.raises(DataError, match=f"^{bad}:2: 'chosen' and 'rejected' do not share the conversation"):
        read_rankings(bad)
    assert len(read_rankings(bad, skip_bad_lines=True)[0]) == 1 and read_rankings(bad, skip_bad_lines=True)[1] == 2
    text = write_jsonl(tmp_path / "text.jsonl", [{"chosen": "just text", "rejected": "more text"}])
    with pytest.raises(DataError, match=f"^{text}:1: 'prompt' is missing and 'chosen' is not an HH-RLHF transcript"):
        read_rankings(text)


def test_ultrafeedback_parquet_holds_the_prompt_once_and_its_scores(tmp_path):
    p = write_parquet(tmp_path / "uf.parquet", ultrafeedback_rows())
    rows, skipped = read_rankings(p)
    assert skipped == 0 and len(rows) == 2
    assert rows[0].messages == [U("What is the capital of France?")]  # the shared prefix dropped
    assert rows[0].texts == ["Paris.", "Rome."] and rows[0].ranks == [1, 2]
    assert rows[0].scores == [9.0, 3.0] and rows[1].scores == [9.0, 4.0]  # they feed min_score_gap / margins
    assert rows[0].source == {"format": "prompt-chosen-rejected"} and rows[1].where == f"{p}:row 2"
    assert rows[1].pairs(min_score_gap=5.5) == [] and rows[0].pairs(min_score_gap=5.5) == [(0, 1)]
    # A prompt file too: the prompt of each preference row.
    assert read_prompts(p) == [[U("What is the capital of France?")], [U("What is 2 + 2?")]]
    # Scores that contradict the labels are refused, naming the row.
    wrong = write_parquet(tmp_path / "w.parquet", [{**ultrafeedback_rows()[0], "score_chosen": 1.0}])
    with pytest.raises(DataError, match=rf"^{wrong}:row 1: 'score_chosen' \(1.0\) is below 'score_rejected'"):
        read_rankings(wrong)


def test_trl_conversational_and_implicit_prompt_pairs(tmp_path):
    rows = [{"prompt": [{"role": "system", "content": "Be brief."}, U("Sky colour?")],
             "chosen": [A("Blue.")], "rejected": [A("Green.")]},
            {"chosen": [U("Hi"), A("Hello.")], "rejected": [U("Hi"), A("Go away.")]},
            {"prompt": "Hi", "chosen": "Hello.", "rejected": "Bye."}]
    a, b, c = read_rankings(write_jsonl(tmp_path / "t.jsonl", rows))[0]
    assert a.messages == rows[0]["prompt"] and a.texts == ["Blue.", "Green."]
    assert b.messages == [U("Hi")] and b.texts == ["Hello.", "Go away."] and b.source == {"format": "chosen-rejected"}
    assert c.messages == [U("Hi")] and c.texts == ["Hello.", "Bye."]
    csv_file = tmp_path / "pairs.csv"  # CSV cells are text: the scores are read as numbers
    csv_file.write_text("prompt,chosen,rejected,score_chosen,score_rejected\nHi,Hello.,Bye.,7.5,2\n")
    (d,), _ = read_rankings(csv_file)
    assert (d.messages, d.texts, d.scores) == ([U("Hi")], ["Hello.", "Bye."], [7.5, 2.0])
    two = write_jsonl(tmp_path / "two.jsonl", [{"prompt": "q", "chosen": [A("a"), U("more"), A("b")], "rejected": "x"}])
    with pytest.raises(DataError, match=f"^{two}:1: 'chosen' must be one assistant answer"):
        read_rankings(two)
    both = write_jsonl(tmp_path / "both.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b",
                                                  "ranked": [{"text": "a", "rank": 1}, {"text": "b", "rank": 2}]}])
    with pytest.raises(DataError, match="has both 'ranked' and 'chosen'/'rejected'"):
        read_rankings(both)


# ----------------------------------------------------------------------------- SFT and prompts

def test_parquet_sft_file_in_every_format(tmp_path):
    p = write_parquet(tmp_path / "sft.parquet", [{"prompt": "Hi", "completion": "Hello."},
                                                  {"prompt": "Two plus two?", "completion": "Four."}])
    convs, skipped = read_conversations(p)
    assert skipped == 0
    assert convs == [(f"{p}:row 1", [U("Hi"), A("Hello.")]), (f"{p}:row 2", [U("Two plus two?"), A("Four.")])]
    conversational = [{"prompt": [{"role": "system", "content": "Be brief."}, U("Two plus two?")], "completion": [A("Four.")]}]
    c = write_parquet(tmp_path / "conv.parquet", conversational)
    assert read_conversations(c)[0] == [(f"{c}:row 1", [*conversational[0]["prompt"], A("Four.")])]
    m = write_parquet(tmp_path / "m.parquet", [{"messages": [U("a"), A("b")]}, {"messages": [U("c")]}])
    with pytest.raises(DataError, match=f"^{m}:row 2: no assistant message to learn from"):
        read_conversations(m)
    assert read_conversations(m, skip_bad_lines=True) == ([(f"{m}:row 1", [U("a"), A("b")])], 1)
    assert read_prompts(m) == [[U("a")], [U("c")]]  # messages minus the last assistant turn
    amb = write_jsonl(tmp_path / "amb.jsonl", [{"prompt": "a", "completion": "b", "response": "c"}])
    with pytest.raises(DataError, match="has 'completion' beside 'messages' or 'response'"):
        read_conversations(amb)


def test_csv_rows_are_named_by_the_line_they_start_on(tmp_path):
    p = tmp_path / "sft.csv"
    # A BOM (spreadsheet export), a quoted field over two lines, a blank line, a row that is one cell short.
    p.write_text('\ufeffprompt,response\n"Say\nhi",Hi!\n\nName a colour,Red.\nshort\n', encoding="utf-8")
    with pytest.raises(DataError, match=f"^{p}:6: has 1 cells, the header has 2"):
        read_conversations(p)
    convs, skipped = read_conversations(p, skip_bad_lines=True)
    assert skipped == 1
    assert convs == [(f"{p}:2", [U("Say\nhi"), A("Hi!")]), (f"{p}:5", [U("Name a colour"), A("Red.")])]


def test_json_list_file(tmp_path):
    p = tmp_path / "d.json"
    p.write_text(json.dumps([{"prompt": "a", "response": "b"}, {"prompt": "c"}]))
    with pytest.raises(DataError, match=f"^{p}:item 2: 'response' is missing"):
        read_conversations(p)
    p.write_text('[{"prompt": "a", "response": "\\ud800"}]')
    with pytest.raises(DataError, match=f"^{p}:item 1: field 'response' holds a lone surrogate"):
        read_conversations(p)
    p.write_text('{"prompt": "a", "response": "b"}\n')
    with pytest.raises(DataError, match=f"^{p}: a .json data file holds a list of records"):
        read_conversations(p)
    p.write_text("[" * 100_000)
    with pytest.raises(DataError, match=f"^{p}"):
        read_conversations(p)


# ----------------------------------------------------------------------------- column maps

def test_a_column_map_and_a_missing_column(tmp_path):
    rows = [{"question": "Hi", "answer": "Hello.", "id": 1}, {"question": "Bye", "answer": "Ciao.", "id": 2}]
    cols = {"prompt": "question", "response": "answer"}
    want = [[U("Hi"), A("Hello.")], [U("Bye"), A("Ciao.")]]
    csv_file = tmp_path / "qa.csv"
    csv_file.write_text("question,answer,id\nHi,Hello.,1\nBye,Ciao.,2\n")
    for p in (write_parquet(tmp_path / "qa.parquet", rows), write_jsonl(tmp_path / "qa.jsonl", rows), csv_file):
        assert [m for _, m in read_conversations(p, columns=cols)[0]] == want, p
    # A mapped column that the source lacks: one line naming the file and the column, before any parsing.
    wrong = {"prompt": "query", "response": "answer"}
    for p, where in [(tmp_path / "qa.parquet", "qa.parquet"), (csv_file, "qa.csv"), (tmp_path / "qa.jsonl", "qa.jsonl:1")]:
        with pytest.raises(DataError, match=f"{where}: no column 'query' \\(the column map reads 'prompt' from it\\)") as e:
            read_conversations(p, columns=wrong, skip_bad_lines=True)
        assert "\n" not in str(e.value)
    # Swapping two columns is a map too; a label column for the classifier.
    swapped = read_rankings(write_jsonl(tmp_path / "s.jsonl", [{"prompt": "q", "chosen": "bad", "rejected": "good"}]),
                            columns={"chosen": "rejected", "rejected": "chosen"})[0][0]
    assert swapped.texts == ["good", "bad"]
    lab = tmp_path / "lab.csv"
    lab.write_text("sentence,sentiment\nlovely,pos\nawful,neg\n")
    assert [x for _, x in classify.read(lab, columns={"text": "sentence", "label": "sentiment"})[0]] == \
        [("lovely", "pos"), ("awful", "neg")]


# ----------------------------------------------------------------------------- folders, saved and Hub datasets

def test_folders_of_files(tmp_path):
    d = tmp_path / "parts"
    d.mkdir()
    write_jsonl(d / "b.jsonl", [{"prompt": "2", "response": "x"}])
    write_jsonl(d / "a.jsonl", [{"prompt": "1", "response": "x"}])
    (d / "README.md").write_text("not data")
    assert [w for w, _ in read_conversations(d)[0]] == [f"{d / 'a.jsonl'}:1", f"{d / 'b.jsonl'}:1"]
    write_parquet(d / "c.parquet", [{"prompt": "3", "response": "x"}])
    with pytest.raises(DataError, match=f"^{d}: holds both .jsonl and .parquet files"):
        read_conversations(d)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=f"^{tmp_path / 'empty'}: is a directory with no .jsonl, .json, .parquet"):
        read_conversations(tmp_path / "empty")


def test_a_dataset_saved_with_datasets_loads_through_the_same_key(tmp_path):
    ds = datasets.Dataset.from_list(ultrafeedback_rows())
    ds.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(str(tmp_path / "dict"))
    from_parquet = read_rankings(write_parquet(tmp_path / "uf.parquet", ultrafeedback_rows()))[0]
    for folder in ("saved", "dict"):
        rows, _ = read_rankings(tmp_path / folder)
        assert [(r.messages, r.texts, r.scores) for r in rows] == [(r.messages, r.texts, r.scores) for r in from_parquet]
        assert rows[1].where == f"{tmp_path / folder}:row 2"
    datasets.DatasetDict({"a": ds, "b": ds}).save_to_disk(str(tmp_path / "two"))
    with pytest.raises(DataError, match="splits a, b and no 'train'"):
        read_rankings(tmp_path / "two")
    with pytest.raises(DataError, match=f"^{tmp_path / 'saved'}: no column 'question'"):
        read_rankings(tmp_path / "saved", columns={"prompt": "question"})


def hub_cache(home: Path, repo: str, files: dict[str, list[dict]]) -> str:
    """A dataset repo in huggingface_hub's cache layout: blobs named by content, snapshots/<commit>/
    holding links to them, refs/main naming the commit."""
    import hashlib

    commit = "1f3a" * 10
    root = home / "hub" / ("datasets--" + repo.replace("/", "--"))
    for rel, rows in files.items():
        tmp = root / "blobs" / "tmp.parquet"
        tmp.parent.mkdir(parents=True, exist_ok=True)
        write_parquet(tmp, rows)
        blob = tmp.with_name(hashlib.sha256(tmp.read_bytes()).hexdigest())
        tmp.rename(blob)
        link = root / "snapshots" / commit / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(commit)
    return commit


def test_a_hub_dataset_id_resolves_from_the_offline_cache(tmp_path):
    home = tmp_path / "hf"
    hub_cache(home, "someorg/prefs", {"data/train-00000-of-00001.parquet": ultrafeedback_rows(),
                                      "data/test-00000-of-00001.parquet": ultrafeedback_rows()[:1]})
    script = (
        "import json\n"
        "from llmtrain.data.preference import read_rankings\n"
        "from llmtrain.errors import DataError\n"
        "out = {}\n"
        "for spec in ['hf:someorg/prefs', 'hf:someorg/prefs@test', 'hf:someorg/missing', 'hf:someorg/prefs@nope']:\n"
        "    try:\n"
        "        rows, _ = read_rankings(spec)\n"
        "        out[spec] = [[r.where, r.messages, r.texts, r.scores] for r in rows]\n"
        "    except DataError as e:\n"
        "        out[spec] = str(e)\n"
        "print('RESULT', json.dumps(out))\n")
    env = {**os.environ, "HF_HOME": str(home), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "PYTHONPATH": str(REPO)}
    env.pop("HF_HUB_CACHE", None), env.pop("HF_DATASETS_CACHE", None), env.pop("HUGGINGFACE_HUB_CACHE", None)
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    out = json.loads(run.stdout.split("RESULT ", 1)[1])
    assert out["hf:someorg/prefs"] == [
        ["hf:someorg/prefs@train:row 1", [U("What is the capital of France?")], ["Paris.", "Rome."], [9.0, 3.0]],
        ["hf:someorg/prefs@train:row 2", [U("What is 2 + 2?")], ["Four.", "Five."], [9.0, 4.0]]]
    assert [w for w, *_ in out["hf:someorg/prefs@test"]] == ["hf:someorg/prefs@test:row 1"]
    assert out["hf:someorg/missing"].startswith("hf:someorg/missing@train: ") and "no copy of it in the Hugging Face cache" \
        in out["hf:someorg/missing"]
    assert out["hf:someorg/prefs@nope"].startswith("hf:someorg/prefs@nope: cannot load") and "nope" in out["hf:someorg/prefs@nope"]
    assert not any("\n" in v for v in out.values() if isinstance(v, str))


def test_a_bad_hub_spec_and_a_missing_extra(tmp_path, monkeypatch):
    for spec in ("hf:", "hf:a/b/c", "hf:org/name@"):
        with pytest.raises(DataError, match="a Hub dataset is written hf:org/name"):
            read_records(spec, dict)
    p = write_parquet(tmp_path / "x.parquet", [{"text": "a", "label": "b"}])
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # as if pyarrow were not installed
    with pytest.raises(DataError, match=rf"^{p}: reading Parquet needs pyarrow: pip install 'llmtrain\[hub\]'"):
        classify.read(p)
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(DataError, match=r"^hf:org/name@train: reading a Hugging Face dataset needs"):
        read_records("hf:org/name", dict)


def test_message_fields_a_parquet_struct_fills_with_null_are_dropped_others_named(tmp_path):
    """Parquet / datasets give every message every field of the column's struct: keys whose value
    is null are dropped; a key with a value we do not read (tool calls) is named."""
    from llmtrain.data.sft import read_conversations

    datasets = pytest.importorskip("datasets")
    rows = [{"messages": [{"role": "user", "content": "Hello?", "tool_calls": None},
                          {"role": "assistant", "content": "Quite so.", "tool_calls": None}]}]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "a.parquet"))
    convs, _ = read_conversations(tmp_path / "a.parquet")
    assert convs[0][1] == [{"role": "user", "content": "Hello?"}, {"role": "assistant", "content": "Quite so."}]
    (tmp_path / "b.jsonl").write_text('{"messages": [{"role": "user", "content": "Hi", "tool_calls": [{"id": 1}]}, '
                                      '{"role": "assistant", "content": "Yes."}]}\n')
    with pytest.raises(DataError, match=r"b.jsonl:1: messages\[0\] has 'tool_calls', which is not read"):
        read_conversations(tmp_path / "b.jsonl")
