import json

import pytest

from llmtrain.data.sft import collate, encode, read_conversations
from llmtrain.errors import DataError
from llmtrain.losses import IGNORE
from llmtrain.scoring import encode_answer
from llmtrain.tokenizer import Tokenizer, parse_chat, render_answer, render_chat

CONV = [
    {"role": "system", "content": "Be posh."},
    {"role": "user", "content": "Hello there"},
    {"role": "assistant", "content": "Good day to you."},
    {"role": "user", "content": "Tea?"},
    {"role": "assistant", "content": "Quite so."},
]


def test_loss_mask_covers_exactly_the_assistant_tokens(tokenizer_path):
    tok = Tokenizer.load(tokenizer_path)
    ids, mask = render_chat(tok, CONV)
    # Build the expectation by hand, piece by piece.
    expect_ids, expect_mask = [tok.bos_id], [0]
    for m in CONV:
        body = tok.encode(m["content"])
        expect_ids += [tok.special[m["role"]], *body, tok.end_id]
        learn = 1 if m["role"] == "assistant" else 0
        expect_mask += [0] + [learn] * (len(body) + 1)  # the role token is given; text and <|end|> are learnt
    assert ids == expect_ids and mask == expect_mask
    learnt = tok.decode([i for i, k in zip(ids, mask) if k])
    assert learnt == "Good day to you.<|end|>Quite so.<|end|>"


def test_cut_off_answer_has_no_closing_end(tokenizer_path):
    tok = Tokenizer.load(tokenizer_path)
    done_ids, done_mask = render_answer(tok, CONV[:2], "Good day")
    cut_ids, cut_mask = render_answer(tok, CONV[:2], "Good day", finished=False)
    assert done_ids[-1] == tok.end_id and done_mask[-1] == 1
    assert (cut_ids, cut_mask) == (done_ids[:-1], done_mask[:-1]) and cut_ids[-1] != tok.end_id
    # the reward model reads the last token: <|end|> for a finished answer, the last word otherwise
    assert encode_answer(tok, CONV[:2], "Good day", 64) == done_ids
    assert encode_answer(tok, CONV[:2], "Good day", 64, finished=False) == cut_ids


def test_template_round_trips(tokenizer_path):
    tok = Tokenizer.load(tokenizer_path)
    assert parse_chat(tok, render_chat(tok, CONV)[0]) == CONV
    ids, mask = render_chat(tok, CONV[:2], add_generation_prompt=True)
    assert ids[-1] == tok.special["assistant"] and mask[-1] == 0


def test_collate_targets_only_responses(tokenizer_path, tmp_path):
    tok = Tokenizer.load(tokenizer_path)
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps({"prompt": "Hi", "response": "Hello"}) + "\n" + json.dumps({"messages": CONV}) + "\n")
    convs, skipped = read_conversations(p)
    ex, dropped = encode(tok, convs, max_len=100)
    x, y = collate(ex, tok.pad_id)
    assert skipped == 0 and dropped == 0 and x.shape == y.shape
    row = [t for t in y[0].tolist() if t != IGNORE]
    assert tok.decode(row) == "Hello<|end|>"
    assert (x[0, len(ex[0].ids) - 1:] == tok.pad_id).all()  # right padding


@pytest.mark.parametrize("line,needle", [
    ('{"prompt": "a"}', "'response' is missing"),
    ('{"messages": [{"role": "robot", "content": "x"}]}', "messages[0].role 'robot'"),
    ('{"messages": [{"role": "user", "content": "x"}]}', "no assistant message"),
    ('{"prompt": "a", "response": 3}', "'response' is missing or not a string"),
    ('{"prompt": "a", "response": "b"', "malformed JSON"),
    ('[1, 2]', "not a JSON object"),
])
def test_malformed_line_names_file_and_line(tmp_path, line, needle):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"prompt": "fine", "response": "yes"}\n\n' + line + "\n")
    with pytest.raises(DataError) as e:
        read_conversations(p)
    assert "bad.jsonl:3: " in str(e.value) and needle in str(e.value)
    convs, skipped = read_conversations(p, skip_bad_lines=True)
    assert len(convs) == 1 and skipped == 1
