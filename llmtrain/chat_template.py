"""A model's own chat template: the Jinja template a Hugging Face tokenizer carries.

A model trained here renders chats with our template (`tokenizer.render_chat`). A model imported
from Hugging Face keeps the template it was trained with; its checkpoint then holds, beside
tokenizer.json (written and read by `tokenizer.write_chat_template` / `read_chat_template`),

    chat_template.jinja      the template, byte for byte as the source had it
    tokenizer_config.json    {"bos_token": ..., "eos_token": ..., "pad_token": ..., "unk_token": ...
                              (the template's variables, strings), "stop_tokens": [...] (the tokens
                              that end an answer: the source's eos token and its generation
                              config's eos_token_id)}

and `Tokenizer.load` finds them there. Rendering follows transformers' `apply_chat_template`:
the template runs in Jinja's immutable sandbox with trim_blocks, lstrip_blocks, loop controls,
`raise_exception`, `strftime_now`, the `tojson` filter, the special tokens as variables and
`{% generation %}` blocks; the text is then tokenized without adding special tokens, so the ids
are those of `apply_chat_template(messages, tokenize=True, add_generation_prompt=...)`.

Text stays text here too: a control token's string inside a message ("<|im_end|>" typed by a
user) is encoded as plain text, never as the control token, as transformers does with
`sanitize_control_tokens=True` (which gives the same ids as without it whenever no message
holds such a string). Stricter than transformers' sandbox: touching an unsafe attribute
(`''.__class__`) is an error at once, not an empty string.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import datetime

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.exceptions import SecurityError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from llmtrain.errors import CheckpointError, DataError

# Private-use characters (plane 16) that mark, in the rendered text, what the template wrote
# inside a {% generation %} block and the control-token strings found in the messages' text.
GEN_START, GEN_END, TEXT_START, TEXT_END = "\U0010fff0", "\U0010fff1", "\U0010fff2", "\U0010fff3"
MARKERS = (GEN_START, GEN_END, TEXT_START, TEXT_END)
_HAS_GENERATION = re.compile(r"\{%-?\s*generation\s*-?%\}")


@dataclass
class ChatTemplate:
    source: str                                             # the Jinja text
    variables: dict[str, str] = field(default_factory=dict)  # bos_token, eos_token, ...
    stop_tokens: list[str] = field(default_factory=list)     # token strings that end an answer
    where: str = "chat template"                            # the file, for messages

    def __post_init__(self):
        self.compiled = _compile(self.source, self.where)
        self.has_generation = bool(_HAS_GENERATION.search(self.source))


# ----------------------------------------------------------------------------- the sandbox

class _Sandbox(ImmutableSandboxedEnvironment):
    """Jinja's immutable sandbox, refusing an unsafe attribute at once instead of handing back
    an undefined value that prints as ''."""

    def unsafe_undefined(self, obj, attribute):
        raise SecurityError(f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe")


class _Generation(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}`: what the model writes; its output is wrapped in
    markers that `render` turns into character spans."""
    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_wrap"), [], [], body).set_lineno(lineno)

    def _wrap(self, caller):
        return GEN_START + caller() + GEN_END


class _Namespace(jinja2.utils.Namespace):
    """`namespace(...)` without underscore names (no way to dunders through it)."""

    def __init__(*args, **kwargs):
        self, rest = args[0], args[1:]
        attrs = dict(*rest, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise SecurityError(f"a namespace attribute may not start with '_' ({name!r})")


class _Dict:
    """`dict(...)` and `dict.fromkeys(...)` in a template, and nothing else of the type."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _environment() -> _Sandbox:
    env = _Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt),
                       dict=_Dict(), namespace=_Namespace)
    return env


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _compile(source: str, where: str):
    if not isinstance(source, str) or not source.strip():
        raise CheckpointError(f"{where}: the chat template is empty or not text")
    try:
        return _environment().from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise CheckpointError(f"{where}:{e.lineno}: not a valid Jinja chat template ({_one_line(e)})") from None


def _plain(value):
    """What the template may see: plain JSON values, rebuilt (no object of the caller's, with
    methods the sandbox does not know, reaches it), markers dropped from strings."""
    if isinstance(value, str):
        s = str.__str__(value)
        return s.translate({ord(m): None for m in MARKERS}) if any(m in s for m in MARKERS) else s
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return str(value)


def _mark_controls(value, controls: re.Pattern | None):
    """Each control-token string in the messages' text wrapped in TEXT markers."""
    if controls is None:
        return value
    if isinstance(value, str):
        return controls.sub(lambda m: TEXT_START + m.group(0) + TEXT_END, value)
    if isinstance(value, dict):
        return {k: _mark_controls(v, controls) for k, v in value.items()}
    if isinstance(value, list):
        return [_mark_controls(v, controls) for v in value]
    return value


def render_marked(tpl: ChatTemplate, messages: list[dict], add_generation_prompt: bool,
                  controls: re.Pattern | None = None) -> str:
    """The template's text for `messages`, with the markers in it; one-line DataError when the
    template refuses the conversation, CheckpointError when it tries to leave the sandbox."""
    msgs = _mark_controls(_plain(list(messages)), controls)
    try:
        return tpl.compiled.render(messages=msgs, tools=None, documents=None,
                                   add_generation_prompt=add_generation_prompt, **tpl.variables)
    except SecurityError as e:
        raise CheckpointError(f"{tpl.where}: the chat template was refused by the sandbox ({_one_line(e)})") from None
    except jinja2.exceptions.TemplateError as e:
        raise DataError(f"{tpl.where}: the chat template refused the conversation ({_one_line(e)})") from None
    except Exception as e:  # a template can fail in Python itself (1 / 0, 'a' + 1, ...)
        raise DataError(f"{tpl.where}: the chat template failed ({type(e).__name__}: {_one_line(e)})") from None


def unmark(text: str) -> tuple[str, list[tuple[int, int]], list[tuple[int, int, bool]]]:
    """Marked text -> (the text, its {% generation %} spans, its pieces (start, end, as_text)):
    a control-token string from a message is a piece encoded as text; a lone marker (a template
    that cut a marked string apart) still separates pieces, so no control token can form across it."""
    out, gen, pieces = [], [], []
    pos, piece_start, gen_start, text_start = 0, 0, None, None
    for ch in text:
        if ch not in MARKERS:
            out.append(ch)
            pos += 1
            continue
        if ch == GEN_START:
            gen_start = pos
        elif ch == GEN_END and gen_start is not None:
            gen.append((gen_start, pos))
            gen_start = None
        elif ch == TEXT_START:
            pieces.append((piece_start, pos, False))
            piece_start, text_start = pos, pos
        elif ch == TEXT_END:
            pieces.append((piece_start, pos, text_start is not None))
            piece_start, text_start = pos, None
    pieces.append((piece_start, pos, False))
    return "".join(out), gen, [p for p in pieces if p[1] > p[0]]


# ----------------------------------------------------------------------------- ids and loss mask

def control_pattern(tk, tpl: ChatTemplate) -> re.Pattern | None:
    """The control tokens a message's text may not forge: the tokenizer's special tokens, and
    its other added tokens that the template writes (a literal string of the template)."""
    env = tpl.compiled.environment
    tree = env.parse(tpl.source)
    literals = "\0".join([n.data for n in tree.find_all(jinja2.nodes.TemplateData)]
                         + [n.value for n in tree.find_all(jinja2.nodes.Const) if isinstance(n.value, str)])
    tokens = [t.content for t in tk.get_added_tokens_decoder().values()
              if t.special or (t.content in literals and not t.content.isspace())]
    tokens.sort(key=len, reverse=True)  # a longer token before one it contains
    return re.compile("|".join(map(re.escape, tokens))) if tokens else None


def _encode_pieces(tok, text: str, pieces: list[tuple[int, int, bool]]) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids of the rendered `text` and each token's character span. One piece (no
    control-token string in any message): the whole text, as apply_chat_template encodes it.
    Otherwise piece by piece, a control-token string from a message as plain text; each later
    piece is encoded after a newline that is then taken off (so a SentencePiece tokenizer does
    not add the space it puts at the start of a text)."""
    if len(pieces) <= 1:
        e = tok.tk_chat.encode(text, add_special_tokens=False)
        return e.ids, e.offsets
    newline = tok.tk_chat.encode("\n", add_special_tokens=False).ids
    ids, offsets = [], []
    for k, (start, end, as_text) in enumerate(pieces):
        enc = tok.tk if as_text else tok.tk_chat  # tok.tk encodes special-token strings as text
        piece, skip, shift = text[start:end], 0, start
        e = enc.encode("\n" + piece, add_special_tokens=False) if k else None
        if e is not None and e.ids[:len(newline)] == newline:
            skip, shift = len(newline), start - 1
        else:
            e = enc.encode(piece, add_special_tokens=False)
        got = e.ids[skip:]
        if as_text and enc.token_to_id(piece) in got:
            raise DataError(f"{tok.template.where}: the control token {piece!r} in a message cannot be "
                            "encoded as text by this tokenizer")
        ids += got
        offsets += [(max(a + shift, start), max(b + shift, start)) for a, b in e.offsets[skip:]]
    return ids, offsets


def _assistant_spans(tpl: ChatTemplate, messages: list[dict], text: str, controls) -> list[tuple[int, int]]:
    """For a template without {% generation %} blocks: each assistant message's characters,
    from the end of the conversation before it with the generation prompt to the end of the
    conversation up to and including it."""
    spans = []
    for i, m in enumerate(messages):
        if m.get("role") != "assistant":
            continue
        before = unmark(render_marked(tpl, messages[:i], True, controls))[0]
        upto = unmark(render_marked(tpl, messages[:i + 1], False, controls))[0]
        if not (text.startswith(before) and text.startswith(upto) and len(before) <= len(upto)):
            raise DataError(f"{tpl.where}: cannot tell which tokens are the assistant's: the chat rendered up "
                            f"to message {i + 1} is not the start of the whole chat (mark the assistant's "
                            "text with {% generation %} ... {% endgeneration %} in the template)")
        spans.append((len(before), len(upto)))
    return spans


def _covered(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[int]:
    """1 on each token overlapping a span (as transformers' assistant mask marks them)."""
    return [int(any(a < e and b > s for s, e in spans)) for a, b in offsets]


def _end_at_stop(ids: list[int], mask: list[int], stops: set[int]) -> list[int]:
    """In each run of 1s, clear what follows its last stop token (ChatML's newline after
    <|im_end|>): the model learns the answer and its end-of-turn token, not the template's next text."""
    mask, i = list(mask), 0
    while i < len(mask):
        if not mask[i]:
            i += 1
            continue
        j = i
        while j < len(mask) and mask[j]:
            j += 1
        last = max((k for k in range(i, j) if ids[k] in stops), default=None)
        if last is not None:
            mask[last + 1:j] = [0] * (j - last - 1)
        i = j
    return mask


def render_template_chat(tok, messages: list[dict], add_generation_prompt: bool) -> tuple[list[int], list[int]]:
    """`tokenizer.render_chat` for a tokenizer with a template: apply_chat_template's ids, and a
    loss mask of 1 on each assistant message's tokens and its end-of-turn token: the tokens in
    {% generation %} blocks when the template has them (transformers' assistant mask), else
    found by rendering the conversation up to each assistant message."""
    tpl = tok.template
    text, gen, pieces = unmark(render_marked(tpl, messages, add_generation_prompt, tok.controls))
    ids, offsets = _encode_pieces(tok, text, pieces)
    if tpl.has_generation:
        return ids, _covered(offsets, gen)
    mask = _covered(offsets, _assistant_spans(tpl, messages, text, tok.controls))
    return ids, _end_at_stop(ids, mask, set(tok.stop_ids))
