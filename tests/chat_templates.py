"""Tiny tokenizers with a model's own chat template (Llama 3, Qwen2.5, ChatML with
{% generation %} blocks) for the tests of issue #17's Build 3; built here, nothing downloaded.
(Importable from any test: pytest puts tests/, the folder of conftest.py, on sys.path.)"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import AddedToken, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

from llmtrain.tokenizer import SPECIAL_TOKENS, Tokenizer, chat_template_from_hf, write_chat_template

transformers = pytest.importorskip("transformers")

# Llama 3 Instruct's template, as published.
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim"
    " + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
# Qwen2.5's template (its tool-calling branches shortened to one), with its default system message.
QWEN = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- for tool in tools %}{{- tool | tojson }}{%- endfor %}
    {{- '<|im_end|>\\n' }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""
# ChatML with {% generation %} blocks (as TRL's and SmolLM3's templates mark the assistant's text).
CHATML_GEN = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{{ '\n' }}{% else %}{{ message['content'] + '<|im_end|>\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
FAMILIES = {  # name: (template, its control tokens, bos, eos, generation_config eos ids as tokens)
    "llama3": (LLAMA3, ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                        "<|eot_id|>"], "<|begin_of_text|>", "<|eot_id|>", ["<|end_of_text|>", "<|eot_id|>"]),
    "qwen": (QWEN, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], None, "<|im_end|>",
             ["<|im_end|>", "<|endoftext|>"]),
    "chatml_gen": (CHATML_GEN, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], None, "<|im_end|>", []),
}
END_OF_TURN = {"llama3": "<|eot_id|>", "qwen": "<|im_end|>", "chatml_gen": "<|im_end|>"}
TEXT = ("Hello there, how are you today? I am fine, thank you. The teapot is on the table; "
        "would you like some tea? Quite so, with milk and sugar please. naïve café 🍵\n") * 20

CONVS = [
    [{"role": "user", "content": "Hello there"}],
    [{"role": "system", "content": "Be posh."}, {"role": "user", "content": "Tea?"},
     {"role": "assistant", "content": "Quite so, with milk."}],
    [{"role": "user", "content": "how are you today?"}, {"role": "assistant", "content": "I am fine, thank you."},
     {"role": "user", "content": "naïve café 🍵"}, {"role": "assistant", "content": "The teapot\nis on the table."}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": " spaced out "},
     {"role": "assistant", "content": "ok"}],
]


def build(tmp_path: Path, family: str, template: str | None = None):
    """A tiny byte-level BPE with the family's control tokens (and ours, as `llmtrain import`
    adds them), as a transformers tokenizer saved to a model folder, and as our checkpoint's
    tokenizer (tokenizer.json + the template files) -> (transformers tokenizer, ours, folder)."""
    tpl, controls, bos, eos, gen_eos = FAMILIES[family]
    tk = HFTokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=380, special_tokens=controls, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator([TEXT], trainer=trainer)
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS.values()])
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, bos_token=bos, eos_token=eos)
    hf.chat_template = template or tpl
    src = tmp_path / f"hf_{family}"
    hf.save_pretrained(src)
    (src / "generation_config.json").write_text(json.dumps({"eos_token_id": [tk.token_to_id(t) for t in gen_eos]}))
    step = tmp_path / f"step_{family}"
    step.mkdir()
    (step / "tokenizer.json").write_text((src / "tokenizer.json").read_text())
    write_chat_template(step, chat_template_from_hf(src, HFTokenizer.from_file(str(src / "tokenizer.json")).id_to_token))
    return hf, Tokenizer.load(step), step


def masked_runs(tok: Tokenizer, ids: list[int], mask: list[int]) -> list[str]:
    runs, cur = [], []
    for i, m in zip(ids, mask):
        if m:
            cur.append(i)
        elif cur:
            runs.append(cur)
            cur = []
    return [tok.decode(r) for r in runs + ([cur] if cur else [])]
