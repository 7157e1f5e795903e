import json

import numpy as np
import pytest

from llmtrain.data.corpus import iter_documents
from llmtrain.data.pretrain import TokenWindows, load_meta, prepare
from llmtrain.errors import DataError
from llmtrain.tokenizer import Tokenizer


def read_split(shards, split):
    meta = load_meta(shards)
    return np.concatenate([np.fromfile(shards / s["file"], dtype=meta["dtype"]) for s in meta["splits"][split]["shards"]])


def test_shards_equal_tokenized_corpus(corpus_file, tokenizer_path, shards):
    tok = Tokenizer.load(tokenizer_path)
    docs = list(iter_documents([str(corpus_file)]))
    expect = {"train": [], "val": []}
    for i, d in enumerate(docs, 1):
        expect["val" if i % 10 == 0 else "train"] += tok.encode_document(d)
    meta = load_meta(shards)
    assert meta["dtype"] == "uint16"
    for split in ("train", "val"):
        assert read_split(shards, split).tolist() == expect[split]
        assert meta["splits"][split]["tokens"] == len(expect[split])


def test_prepare_is_deterministic_and_shards_roll_over(corpus_file, tokenizer_path, shards, tmp_path):
    out = tmp_path / "again"
    meta = prepare([str(corpus_file)], str(tokenizer_path), str(out), val_every=10, shard_tokens=5000)
    assert len(meta["splits"]["train"]["shards"]) > 1
    assert read_split(out, "train").tolist() == read_split(shards, "train").tolist()


def test_jsonl_input_and_bad_line(tokenizer_path, tmp_path):
    good = tmp_path / "c.jsonl"
    good.write_text("\n".join(json.dumps({"text": f"document number {i}"}) for i in range(20)) + "\n")
    assert list(iter_documents([str(good)]))[3] == "document number 3"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": "broken\n')
    out = tmp_path / "shards"
    with pytest.raises(DataError, match=r"bad.jsonl:2: malformed JSON"):
        prepare([str(bad)], str(tokenizer_path), str(out), val_every=2)
    assert not out.exists() and not list(tmp_path.glob("shards.tmp*"))  # nothing half-written
    nofield = tmp_path / "nofield.jsonl"
    nofield.write_text('{"body": "x"}\n')
    with pytest.raises(DataError, match=r"nofield.jsonl:1: no field 'text'"):
        list(iter_documents([str(nofield)]))


def test_missing_input_and_missing_shards(tmp_path):
    with pytest.raises(DataError, match="input not found"):
        list(iter_documents([str(tmp_path / "nothing.txt")]))
    with pytest.raises(DataError, match="missing meta.json"):
        TokenWindows(tmp_path, "train", 16, 0)


def test_windows_are_slices_of_the_shard(shards):
    w = TokenWindows(shards, "train", 16, seed=3)
    data = read_split(shards, "train")
    x, y = w.batch(step=5, batch_size=4)
    assert x.shape == (4, 16) and (x[:, 1:] == y[:, :-1]).all()
    for row_x, row_y in zip(x.numpy(), y.numpy()):
        starts = np.flatnonzero(data[: len(data) - 16] == row_x[0])
        assert any((data[s:s + 16] == row_x).all() and data[s + 16] == row_y[-1] for s in starts)


def test_window_partition_across_micro_steps_and_ranks(shards):
    w = TokenWindows(shards, "train", 16, seed=3)
    big, _ = w.batch(step=2, batch_size=4)
    again, _ = w.batch(step=2, batch_size=4)
    assert (big == again).all()  # a step's batch is a function of (seed, step): resume-safe
    micro = np.concatenate([w.batch(2, 1, micro=m, grad_accum=4)[0].numpy() for m in range(4)])
    ranks = np.concatenate([w.batch(2, 2, rank=r, world=2)[0].numpy() for r in range(2)])
    assert (micro == big.numpy()).all() and (ranks == big.numpy()).all()
    assert not (w.batch(3, 4)[0] == big).all()


# ----------------------------------------------------------------------------- #15 review: text that is not text


@pytest.mark.parametrize("line,needle", [
    ('{"prompt": "\\ud800", "response": "x"}', "field 'prompt' holds a lone surrogate"),
    ('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b\\uDFFF"}]}',
     "field 'messages[1].content'"),
    ('{"\\ud800": 1, "prompt": "a", "response": "b"}', "a key of the line"),
])
def test_a_lone_surrogate_names_file_line_and_field(tmp_path, line, needle):
    from llmtrain.data.sft import read_conversations

    p = tmp_path / "d.jsonl"
    p.write_text('{"prompt": "ok \\ud83d\\ude00", "response": "fine"}\n' + line + "\n")  # a pair is text
    with pytest.raises(DataError, match=f"^{p}:2: {needle}".replace("[", r"\[").replace("]", r"\]")):
        read_conversations(p)


def test_surrogates_in_tokenizer_inputs(tmp_path):
    p = tmp_path / "t.jsonl"
    p.write_text('{"text": "a"}\n{"text": "\\udc80"}\n')
    with pytest.raises(DataError, match=f"^{p}:2: field 'text'"):
        list(iter_documents([str(p)]))


def test_ambiguous_lines_and_self_beating_pairs(tmp_path):
    from llmtrain.data.preference import read_rankings
    from llmtrain.data.prompts import read_prompts
    from llmtrain.data.sft import read_conversations

    p = tmp_path / "a.jsonl"
    p.write_text(json.dumps({"prompt": "a", "response": "b", "messages": [{"role": "user", "content": "c"},
                                                                          {"role": "assistant", "content": "d"}]}) + "\n")
    with pytest.raises(DataError, match=f"^{p}:1: has both 'messages' and 'prompt'/'response'"):
        read_conversations(p)
    p.write_text(json.dumps({"prompt": "a", "messages": [{"role": "user", "content": "c"}]}) + "\n")
    with pytest.raises(DataError, match=f"^{p}:1: has both 'prompt' and 'messages'"):
        read_prompts(p)
    r = tmp_path / "r.jsonl"
    # A person ranked two identical candidates apart (the app allows it and its export must import):
    # "a beats a" is no preference pair; the ties and the real pairs stay.
    line = {"prompt": "p", "ranked": [{"text": "a", "rank": 1}, {"text": "b", "rank": 2}, {"text": "a", "rank": 3},
                                      {"text": "c", "rank": 3}]}
    r.write_text(json.dumps(line) + "\n")
    pairs = read_rankings(r)[0][0].pairs()
    assert pairs == [(0, 1), (0, 3), (1, 2), (1, 3)]
