import pytest

from llmtrain.errors import DataError
from llmtrain.tokenizer import SPECIAL_TOKENS, Tokenizer

SAMPLES = [
    "",
    "Hello, world!",
    "  leading and trailing spaces  ",
    "tabs\tand\nnew\r\nlines\n\n",
    "naïve café, Straße, Ελληνικά, русский, 日本語のテキスト, 한국어",
    "emoji 🤖🚀 and combining e\u0301 and zero\u200bwidth",
    "control \x00\x01\x7f chars",
    "a literal <|end|> marker and <|bos|> too",
    "x" * 5000,
]


@pytest.mark.parametrize("text", SAMPLES)
def test_round_trip_exact(tokenizer_path, text):
    tok = Tokenizer.load(tokenizer_path)
    assert tok.decode(tok.encode(text)) == text


def test_round_trip_random_unicode(tokenizer_path):
    import random

    tok = Tokenizer.load(tokenizer_path)
    rng = random.Random(0)
    for _ in range(200):
        s = "".join(chr(rng.choice([rng.randrange(32, 127), rng.randrange(0xA0, 0xD7FF), rng.randrange(0xE000, 0x10FFFF)]))
                    for _ in range(rng.randrange(1, 40)))
        s = s.encode("utf-8", "replace").decode("utf-8")
        assert tok.decode(tok.encode(s)) == s


def test_special_tokens_and_size(tokenizer_path):
    tok = Tokenizer.load(tokenizer_path)
    assert tok.vocab_size <= 512
    ids = {tok.tk.token_to_id(t) for t in SPECIAL_TOKENS.values()}
    assert len(ids) == len(SPECIAL_TOKENS)
    assert tok.encode_document("hi")[0] == tok.bos_id and tok.encode_document("hi")[-1] == tok.eos_id
    # A special token is one id (placed by id); its string in text is text, never that id.
    assert tok.tk.token_to_id("<|end|>") == tok.end_id == tok.special["end"]
    assert tok.end_id not in tok.encode("<|end|>") and tok.decode(tok.encode("<|end|>")) == "<|end|>"


def test_missing_tokenizer_is_clear(tmp_path):
    with pytest.raises(DataError, match="tokenizer not found"):
        Tokenizer.load(tmp_path / "none.json")
