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
