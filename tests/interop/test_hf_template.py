"""A Hugging Face model's own chat template through import, a stage and export (issue #17,
Build 3): imported with a Llama-3 or a ChatML (Qwen2.5) template, our rendered ids and SFT loss
mask equal transformers' apply_chat_template (and its assistant mask where the template marks
one), an SFT step keeps the template in its checkpoint, and the exported folder's tokenizer gives
the same ids again through transformers. Nothing is downloaded: the models are built here."""
from __future__ import annotations

import json

import pytest
import torch

from llmtrain import checkpoint
from llmtrain.config import SFTConfig, load_config
from llmtrain.data.sft import encode
from llmtrain.interop.hf import export_hf, import_hf
from llmtrain.stages import sft
from llmtrain.tokenizer import Tokenizer, render_chat

transformers = pytest.importorskip("transformers")
from chat_templates import CONVS, END_OF_TURN, FAMILIES, build, masked_runs  # noqa: E402


def hf_model_folder(tmp_path, family: str):
    """A tiny random Llama (or Qwen2) with the family's tokenizer and template, saved as
    `save_pretrained` writes a published model; -> (transformers tokenizer, folder)."""
    hf_tok, _, _ = build(tmp_path, family)
    src = tmp_path / f"hf_{family}"
    common = dict(vocab_size=len(hf_tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256)
    cfg = (transformers.Qwen2Config(**common, use_sliding_window=False) if family != "llama3"
           else transformers.LlamaConfig(**common))
    torch.manual_seed(0)
    model = (transformers.Qwen2ForCausalLM if family != "llama3" else transformers.LlamaForCausalLM)(cfg)
    model.save_pretrained(src)
    return hf_tok, src


def apply(hf_tok, conv, gen=False):
    return hf_tok.apply_chat_template(conv, tokenize=True, return_dict=False, add_generation_prompt=gen)


@pytest.mark.parametrize("family", ["llama3", "qwen", "chatml_gen"])
def test_import_keeps_the_template_and_export_gives_it_back(tmp_path, family):
    hf_tok, src = hf_model_folder(tmp_path, family)
    summary = import_hf(src, tmp_path / "imported")
    step = checkpoint.resolve(tmp_path / "imported")
    assert (step / "chat_template.jinja").read_text(encoding="utf-8") == FAMILIES[family][0]
    assert summary["stop_tokens"][0] == END_OF_TURN[family]
    tok = Tokenizer.load(checkpoint.tokenizer_of(step))
    for conv in CONVS:
        for gen in (False, True):
            assert render_chat(tok, conv, gen)[0] == apply(hf_tok, conv, gen), (conv, gen)
        if conv[-1]["role"] != "assistant":
            continue  # nothing to learn from: SFT skips it
        ex = encode(tok, [("t:1", conv)], max_len=10_000)[0][0]
        assert ex.ids == apply(hf_tok, conv)
        answers = [m["content"] for m in conv if m["role"] == "assistant"]
        if family == "chatml_gen":  # the template marks the answers: transformers' own mask
            out = hf_tok.apply_chat_template(conv, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
            assert [int(m > 0) for m in ex.mask] == out["assistant_masks"]
        # the loss is on each answer and its end-of-turn token, nothing else
        assert masked_runs(tok, ex.ids, [int(m > 0) for m in ex.mask]) == [
            (a.strip() if family == "llama3" else a) + END_OF_TURN[family] for a in answers]

    # Exported: transformers reads the folder and renders the same ids with the same template.
    export_hf(step, tmp_path / "exported")
    back = transformers.AutoTokenizer.from_pretrained(tmp_path / "exported")
    assert back.chat_template == FAMILIES[family][0]
    for conv in CONVS:
        assert apply(back, conv, True) == apply(hf_tok, conv, True)
    gen_cfg = json.loads((tmp_path / "exported" / "generation_config.json").read_text())
    assert gen_cfg["eos_token_id"] == list(tok.stop_ids)
    assert tok.tk.id_to_token(gen_cfg["eos_token_id"][0]) == END_OF_TURN[family]


def test_a_stage_keeps_the_imported_template_in_its_checkpoints(tmp_path):
    hf_tok, src = hf_model_folder(tmp_path, "qwen")
    import_hf(src, tmp_path / "imported")
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps({"messages": c}) + "\n" for c in CONVS * 3 if c[-1]["role"] == "assistant"))
    cfg = load_config(SFTConfig, None, [f"init_from={tmp_path / 'imported'}", f"data.train={data}", "data.val_every=3",
                                        f"run.out_dir={tmp_path / 'sft'}", "run.max_steps=1", "run.batch_size=2",
                                        "sample_prompts=0", "run.eval_every=0"])
    sft.main(cfg)
    step = checkpoint.resolve(tmp_path / "sft")
    assert (step / "chat_template.jinja").is_file() and (step / "tokenizer_config.json").is_file()
    tok = Tokenizer.load(checkpoint.tokenizer_of(step))
    assert tok.template is not None
    for conv in CONVS:
        assert render_chat(tok, conv, True)[0] == apply(hf_tok, conv, True)
