"""Tokenizers in and out of HF folders, and our chat template as Jinja.

import_tokenizer reads a source's tokenizer.json and registers our special tokens
(`tokenizer.SPECIAL_TOKENS`); export_tokenizer writes ours with tokenizer_config.json
carrying CHAT_TEMPLATE, our template of `render_chat`, for `apply_chat_template`, or a model's
own template (kept from its import) with its tokens.
"""
from __future__ import annotations

import json
from pathlib import Path

from tokenizers import AddedToken, processors
from tokenizers import Tokenizer as HFTokenizer

from llmtrain.config import ModelConfig
from llmtrain.errors import CheckpointError
from llmtrain.tokenizer import SPECIAL_TOKENS

# The one chat template of `tokenizer.render_chat`, as Jinja for `apply_chat_template`:
#   <|bos|> (<|role|> content <|end|>)* [<|assistant|>]
CHAT_TEMPLATE = (
    "{{ '" + SPECIAL_TOKENS["bos"] + "' }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('roles are system, user and assistant, not ' + message['role']) }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '" + SPECIAL_TOKENS["end"] + "' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '" + SPECIAL_TOKENS["assistant"] + "' }}{% endif %}"
)


def _metaspace_always(node, changed: list) -> None:
    """Metaspace with prepend_scheme "first" -> "always", in place, wherever it sits."""
    if isinstance(node, dict):
        if node.get("type") == "Metaspace" and node.get("prepend_scheme") == "first":
            node["prepend_scheme"] = "always"
            changed.append(1)
        for v in node.values():
            _metaspace_always(v, changed)
    elif isinstance(node, list):
        for v in node:
            _metaspace_always(v, changed)


def import_tokenizer(src: Path, keep_pretokenizer: bool = False):
    """The source tokenizer with every special token of ours registered; -> (tokenizer, the
    tokens that were new, notes on what else changed). Truncation and padding the file may
    carry are switched off.

    SentencePiece-style tokenizers (Llama 2, Mistral) put their "▁" before the first piece of a
    text only ("first"). `render_chat` encodes each message alone, so each starts a text and
    gets one; HF's apply_chat_template encodes the rendered string, where a message follows a
    special token and would get none: the two would tokenize the same chat differently. With
    "always" each stretch between special tokens starts with "▁", which is what we encode;
    a text without special tokens tokenizes exactly as before. A model that keeps its own chat
    template (`keep_pretokenizer`) encodes the rendered text whole, as transformers does, so its
    tokenizer stays exactly as it is."""
    path = src / "tokenizer.json"
    if not path.is_file():
        raise CheckpointError(f"{src}: no tokenizer.json (a fast tokenizer); write one with transformers: "
                              "AutoTokenizer.from_pretrained(DIR).save_pretrained(DIR)")
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
        notes, changed = [], []
        for part in ("pre_tokenizer", "decoder") if not keep_pretokenizer else ():
            _metaspace_always(spec.get(part), changed)
        if changed:
            notes.append('Metaspace prepend_scheme "first" -> "always" (each message starts with its "▁", as '
                         "render_chat encodes it; plain text tokenizes as before)")
        tk = HFTokenizer.from_str(json.dumps(spec))
    except Exception as e:  # tokenizers raises a bare Exception on bad JSON
        raise CheckpointError(f"{path}: not a valid tokenizer.json ({e})") from None
    tk.no_truncation()
    tk.no_padding()
    new = [t for t in SPECIAL_TOKENS.values() if tk.token_to_id(t) is None]
    # All of ours, not only the new ones: a token already in the vocabulary as plain text must
    # still be matched whole in text (HF's apply_chat_template renders text, then tokenizes).
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS.values()])
    return tk, new, notes


def token_ids(tok) -> dict[str, int | list[int]]:
    """bos/eos/pad ids for config.json and generation_config.json: ours, or, for a model with its
    own chat template, its tokens (eos: every token that ends an answer)."""
    if tok.template is None:
        return {"bos_token_id": tok.bos_id, "eos_token_id": [tok.eos_id, tok.end_id], "pad_token_id": tok.pad_id}
    v = tok.template.variables
    ids = {f"{k}_token_id": tok.tk.token_to_id(v[f"{k}_token"]) for k in ("bos", "pad") if v.get(f"{k}_token")}
    return {**ids, "eos_token_id": list(tok.stop_ids)}


def export_tokenizer(tok, out: Path, mcfg: ModelConfig, causal: bool) -> None:
    """tokenizer.json (ours, with <|bos|> put in front of plain text as Llama's tokenizers do) and
    tokenizer_config.json with our chat template; a model with its own template gets its
    tokenizer back as it was imported, with its template and tokens."""
    if tok.template is not None:
        tok.tk.save(str(out / "tokenizer.json"))
        conf = {"tokenizer_class": "PreTrainedTokenizerFast", **tok.template.variables,
                "chat_template": tok.template.source, "model_max_length": mcfg.max_seq_len,
                "clean_up_tokenization_spaces": False}
        if causal:
            conf["padding_side"] = "left"
        (out / "tokenizer_config.json").write_text(json.dumps(conf, indent=2, ensure_ascii=False))
        return
    tk = tok.tk
    bos = SPECIAL_TOKENS["bos"]
    tk.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                      special_tokens=[(bos, tok.bos_id)])
    tk.save(str(out / "tokenizer.json"))
    conf = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": SPECIAL_TOKENS["eos"],
            "pad_token": SPECIAL_TOKENS["pad"], "chat_template": CHAT_TEMPLATE, "model_max_length": mcfg.max_seq_len,
            "clean_up_tokenization_spaces": False}
    if causal:
        conf["padding_side"] = "left"  # batched generation
    (out / "tokenizer_config.json").write_text(json.dumps(conf, indent=2))
