"""Byte-level BPE tokenizer (Hugging Face `tokenizers`): training, loading, special tokens.

Byte-level means every UTF-8 string maps to tokens and back exactly: the base alphabet is
the 256 bytes, so there is no unknown token and `decode(encode(s)) == s` for any `s`.
The special tokens are fixed here once for every stage: documents are `<|bos|> text <|eos|>`,
and the chat template (fine-tuning and later) marks roles with `<|system|>`, `<|user|>`,
`<|assistant|>` and ends each turn with `<|end|>`.

Text stays text: a special token's string inside a message, prompt, data line or model output
(`"hi<|end|><|user|>x"`) encodes as ordinary tokens, never as the control token, so no text can
forge a turn of the template. Control tokens enter a sequence only by id, where
`encode_document` and `render_chat` put them. (`tokenizers` matches added tokens in raw text
even with `add_special_tokens=False`; its `encode_special_tokens` switch turns that off for the
tokens marked special: all of ours, and an imported tokenizer's own such as `<s>`.)
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Iterator

from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

from llmtrain.errors import DataError
from llmtrain.files import publish

SPECIAL_TOKENS = {
    "pad": "<|pad|>",
    "bos": "<|bos|>",
    "eos": "<|eos|>",
    "system": "<|system|>",
    "user": "<|user|>",
    "assistant": "<|assistant|>",
    "end": "<|end|>",
}


class Tokenizer:
    """A thin wrapper that knows our special tokens; use `Tokenizer.load(path)`."""

    def __init__(self, tk, path: str | Path = ""):
        self.tk = tk
        self.path = str(path)
        ids = {}
        for name, tok in SPECIAL_TOKENS.items():
            i = tk.token_to_id(tok)
            if i is None:
                raise DataError(f"{path}: tokenizer lacks the special token {tok} (train it with `llmtrain tokenizer`)")
            ids[name] = i
        self.special = ids
        self.pad_id, self.bos_id, self.eos_id = ids["pad"], ids["bos"], ids["eos"]
        self.end_id = ids["end"]
        try:  # special-token strings in text encode as text (see the module's docstring)
            tk.encode_special_tokens = True
        except AttributeError:
            raise DataError("the installed `tokenizers` cannot encode special-token strings as text; "
                            "upgrade it (pip install -U 'tokenizers>=0.15.1')") from None

    @classmethod
    def load(cls, path: str | Path) -> "Tokenizer":
        p = Path(path)
        if p.is_dir():
            p = p / "tokenizer.json"
        if not p.is_file():
            raise DataError(f"tokenizer not found: {p}")
        try:
            tk = HFTokenizer.from_file(str(p))
        except Exception as e:  # tokenizers raises a bare Exception on bad JSON
            raise DataError(f"{p}: not a valid tokenizer.json ({e})") from None
        return cls(tk, p)

    @property
    def vocab_size(self) -> int:
        return self.tk.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; no special tokens are added, and special-token strings in the
        text are ordinary text (`decode(encode(text)) == text`)."""
        return self.tk.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tk.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        return self.tk.decode(list(ids), skip_special_tokens=skip_special)

    def encode_document(self, text: str) -> list[int]:
        """A pretraining document: `<|bos|> text <|eos|>`."""
        return [self.bos_id, *self.encode(text), self.eos_id]


def train_tokenizer(texts: Iterator[str], vocab_size: int, out: str | Path, min_frequency: int = 2,
                    max_chars: int = 0) -> Tokenizer:
    """Train a byte-level BPE on a stream of texts and save it atomically to `out`."""
    n_special = len(SPECIAL_TOKENS)
    if vocab_size < 256 + n_special:
        raise DataError(f"vocab_size {vocab_size} is below the 256 byte tokens + {n_special} special tokens")
    tk = HFTokenizer(models.BPE())
    # No prefix space: a leading space would be added on encode and kept on decode,
    # breaking the exact round trip.
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=True,
    )

    def limited() -> Iterator[str]:
        seen = 0
        for t in texts:
            yield t
            seen += len(t)
            if max_chars and seen >= max_chars:
                return

    tk.train_from_iterator(limited(), trainer=trainer)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    tk.save(str(tmp))
    publish(tmp, out)
    return Tokenizer(tk, out)


# ----------------------------------------------------------------------------- chat template

ROLES = ("system", "user", "assistant")


def render_chat(tok: Tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> tuple[list[int], list[int]]:
    """The one chat template, used for training, generation, ranking candidates and RLHF.

        <|bos|> <|system|> text <|end|> <|user|> text <|end|> <|assistant|> text <|end|> ...

    Returns token ids and a loss mask of the same length: 1 on the tokens the model must learn
    to write (each assistant message's text and its closing <|end|>), 0 elsewhere. With
    `add_generation_prompt`, an opening <|assistant|> is appended for the model to continue.
    A message's content is text: a `<|end|>` or `<|user|>` written in it encodes as ordinary
    tokens, so the only control ids are those placed here.
    """
    ids, mask = [tok.bos_id], [0]
    for m in messages:
        role = m["role"]
        body = tok.encode(m["content"]) + [tok.end_id]
        ids += [tok.special[role]] + body
        mask += [0] + [1 if role == "assistant" else 0] * len(body)
    if add_generation_prompt:
        ids.append(tok.special["assistant"])
        mask.append(0)
    return ids, mask


def render_answer(tok: Tokenizer, messages: list[dict], answer: str, finished: bool = True) -> tuple[list[int], list[int]]:
    """`render_chat` of (conversation, answer). An answer that was cut off (`finished` false:
    it hit the token limit before <|end|>) is rendered without its closing <|end|>, so a reward
    model reading the last token, and DPO's log-probs, see that it never ended."""
    ids, mask = render_chat(tok, [*messages, {"role": "assistant", "content": answer}])
    return (ids, mask) if finished else (ids[:-1], mask[:-1])


def parse_chat(tok: Tokenizer, ids: list[int]) -> list[dict]:
    """Inverse of `render_chat` (without a trailing generation prompt): ids -> messages."""
    role_of = {tok.special[r]: r for r in ROLES}
    messages, role, body = [], None, []
    for i in ids:
        if i == tok.bos_id:
            continue
        if i in role_of and role is None:
            role, body = role_of[i], []
        elif i == tok.end_id and role is not None:
            messages.append({"role": role, "content": tok.decode(body)})
            role = None
        else:
            body.append(i)
    return messages
