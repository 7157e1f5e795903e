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

A model imported from Hugging Face keeps its own chat template: `chat_template.jinja` and
`tokenizer_config.json` beside its tokenizer.json (`write_chat_template`; `Tokenizer.load`
reads them into `tok.template`), and `render_chat`, `render_answer` and `tok.stop_ids` then
follow that template (llmtrain/chat_template.py). Without those files: ours, as above.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Iterable, Iterator

from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

from llmtrain.chat_template import ChatTemplate, control_pattern, render_template_chat
from llmtrain.errors import CheckpointError, DataError
from llmtrain.files import publish, write_file

SPECIAL_TOKENS = {
    "pad": "<|pad|>",
    "bos": "<|bos|>",
    "eos": "<|eos|>",
    "system": "<|system|>",
    "user": "<|user|>",
    "assistant": "<|assistant|>",
    "end": "<|end|>",
}
TEMPLATE_FILE = "chat_template.jinja"
CONFIG_FILE = "tokenizer_config.json"
VARIABLES = ("bos_token", "eos_token", "pad_token", "unk_token")  # given to a template when set


class Tokenizer:
    """A thin wrapper that knows our special tokens; use `Tokenizer.load(path)`."""

    def __init__(self, tk, path: str | Path = "", template: ChatTemplate | None = None):
        self.tk = tk
        self.path = str(path)
        self.template = template  # None: our template (`render_chat`); else the model's own
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
        if template is not None:
            self._use_template(template)

    def _use_template(self, template: ChatTemplate) -> None:
        """A second copy that matches the control tokens in a rendered chat (as transformers
        encodes it), the control tokens messages may not forge, and the stop ids."""
        self.tk_chat = HFTokenizer.from_str(self.tk.to_str())
        self.tk_chat.encode_special_tokens = False
        self.controls = control_pattern(self.tk, template)
        names = template.stop_tokens or [template.variables.get("eos_token")]
        stops = [self.tk.token_to_id(n) if n else None for n in names]
        if None in stops:
            raise CheckpointError(f"{template.where}: the stop token {names[stops.index(None)]!r} "
                                  "(tokenizer_config.json 'stop_tokens', or 'eos_token') is not in the tokenizer")
        self._template_stops = tuple(stops)

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """The ids that end an answer: ours <|end|> and <|eos|>; a model with its own template,
        its end-of-turn and eos tokens (its tokenizer's eos and generation config's eos ids)."""
        return (self.end_id, self.eos_id) if self.template is None else self._template_stops

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
        return cls(tk, p, read_chat_template(p.parent))

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


# ----------------------------------------------------------------------------- a model's own template: files

def _token_string(value, where: str, key: str) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):  # an AddedToken, serialized
        return value["content"]
    raise CheckpointError(f"{where}: '{key}' must be a token string, got {type(value).__name__}")


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:
        raise CheckpointError(f"{path}: unreadable JSON ({type(e).__name__})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def read_chat_template(folder: str | Path) -> ChatTemplate | None:
    """The template saved in `folder` (a checkpoint's step folder, beside tokenizer.json) by
    `write_chat_template`, or None (our template) when there is no chat_template.jinja."""
    folder = Path(folder)
    path = folder / TEMPLATE_FILE
    if not path.is_file():
        return None
    try:
        source = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable ({type(e).__name__})") from None
    conf_path = folder / CONFIG_FILE
    conf = _read_json(conf_path)
    variables = {k: v for k in VARIABLES if (v := _token_string(conf.get(k), str(conf_path), k)) is not None}
    stops = conf.get("stop_tokens", [])
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise CheckpointError(f"{conf_path}: 'stop_tokens' must be a list of token strings")
    return ChatTemplate(source, variables, stops, str(path))


def write_chat_template(folder: str | Path, tpl: ChatTemplate) -> None:
    """Save `tpl` into `folder` (beside its tokenizer.json), each file atomically."""
    folder = Path(folder)
    conf = {**tpl.variables, "stop_tokens": list(tpl.stop_tokens)}
    for name, text in ((TEMPLATE_FILE, tpl.source), (CONFIG_FILE, json.dumps(conf, indent=2, ensure_ascii=False))):
        write_file(folder / name, text)


def copy_tokenizer_files(tokenizer_json: str | Path, dest: str | Path) -> None:
    """Copy tokenizer.json and, when it has them, its chat template's files into folder `dest`
    (what `checkpoint.save` must do, so a checkpoint keeps its model's template)."""
    src = Path(tokenizer_json)
    shutil.copyfile(src, Path(dest) / "tokenizer.json")
    for name in (TEMPLATE_FILE, CONFIG_FILE):
        if (src.parent / TEMPLATE_FILE).is_file() and (src.parent / name).is_file():
            shutil.copyfile(src.parent / name, Path(dest) / name)


def _hf_template(folder: Path, conf: dict) -> str | None:
    """The source's template: chat_template.jinja, else tokenizer_config.json's "chat_template"
    (a string, or a list of named templates of which "default" is the chat one)."""
    if (folder / TEMPLATE_FILE).is_file():
        return (folder / TEMPLATE_FILE).read_text(encoding="utf-8")
    t = conf.get("chat_template")
    if isinstance(t, list):
        named = {d.get("name"): d.get("template") for d in t if isinstance(d, dict)}
        t = named.get("default")
    if t is not None and not isinstance(t, str):
        raise CheckpointError(f"{folder / CONFIG_FILE}: 'chat_template' must be a string (or named templates)")
    return t


def chat_template_from_hf(folder: str | Path, token_to_string) -> ChatTemplate | None:
    """A Hugging Face model folder's chat template with its variables and stop tokens, or None
    when it has none. `token_to_string(id)`: the imported tokenizer's `id_to_token`, to name
    generation_config.json's eos_token_id as token strings."""
    folder = Path(folder)
    conf_path = folder / CONFIG_FILE
    conf = _read_json(conf_path)
    source = _hf_template(folder, conf)
    if source is None:
        return None
    variables = {k: v for k in VARIABLES if (v := _token_string(conf.get(k), str(conf_path), k)) is not None}
    stops = [variables["eos_token"]] if "eos_token" in variables else []
    gen_path = folder / "generation_config.json"
    eos = _read_json(gen_path).get("eos_token_id")
    for i in eos if isinstance(eos, list) else [] if eos is None else [eos]:
        name = token_to_string(i) if isinstance(i, int) else None
        if name is None:
            raise CheckpointError(f"{gen_path}: eos_token_id {i!r} is not a token of the tokenizer")
        stops.append(name)
    where = str(folder / TEMPLATE_FILE) if (folder / TEMPLATE_FILE).is_file() else f"{conf_path} 'chat_template'"
    return ChatTemplate(source, variables, list(dict.fromkeys(stops)), where)


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

    A tokenizer with a model's own template (`tok.template`) renders with it instead: the ids
    of transformers' `apply_chat_template`, and the loss mask on each assistant message's
    tokens and its end-of-turn token (see llmtrain/chat_template.py).
    """
    if tok.template is not None:
        return render_template_chat(tok, messages, add_generation_prompt)
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
    model reading the last token, and DPO's log-probs, see that it never ended.

    With a model's own template the sequence ends where the answer's tokens end (its
    end-of-turn token, not the newline ChatML writes after it), as a sampled answer does;
    cut off, without its trailing stop token(s)."""
    ids, mask = render_chat(tok, [*messages, {"role": "assistant", "content": answer}])
    if tok.template is None:
        return (ids, mask) if finished else (ids[:-1], mask[:-1])
    end = max((i + 1 for i, m in enumerate(mask) if m), default=len(ids))
    if not finished:
        while end > 0 and mask[end - 1] and ids[end - 1] in tok.stop_ids:
            end -= 1
    return ids[:end], mask[:end]


def parse_chat(tok: Tokenizer, ids: list[int]) -> list[dict]:
    """Inverse of `render_chat` (without a trailing generation prompt): ids -> messages. Our
    template only: a model's own template cannot be read back in general (it may trim, add a
    default system message, drop reasoning), so a tokenizer with one is refused."""
    if tok.template is not None:
        raise ValueError(f"parse_chat reads our chat template only, not the model's own ({tok.template.where})")
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
