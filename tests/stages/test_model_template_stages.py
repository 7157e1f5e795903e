"""A checkpoint whose tokenizer carries a model's own chat template (issue #17, Build 3): chat,
feedback candidates, the reward model's input, DPO's log-probs and SFT's examples render with
that template and stop at its end-of-turn token, not at ours."""
from __future__ import annotations

import pytest
import torch

from llmtrain import checkpoint
from llmtrain.config import ModelConfig
from llmtrain.data.preference import Ranking
from llmtrain.data.sft import encode
from llmtrain.errors import DataError
from llmtrain.generate import SamplingConfig
from llmtrain.model import Transformer
from llmtrain.scoring import encode_answer
from llmtrain.stages.dpo import answer_logprobs
from llmtrain.tokenizer import Tokenizer, copy_tokenizer_files, render_answer, render_chat

pytest.importorskip("transformers")
from chat_templates import CONVS, build  # noqa: E402  (tests/chat_templates.py)


@pytest.fixture()
def qwen_ckpt(tmp_path):
    """A tiny random model saved as a checkpoint with the Qwen-templated tokenizer (its
    template files copied beside tokenizer.json, as checkpoint.save is to do)."""
    hf, tok, step = build(tmp_path, "qwen")
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tok.vocab_size, dim=32, n_layers=1, n_heads=2, max_seq_len=160))
    run = tmp_path / "run"
    saved = checkpoint.save(run, 1, model, config={"model": vars(model.config), "stage": "sft"}, meta={"tokens": 0},
                            tokenizer_path=str(step / "tokenizer.json"))
    copy_tokenizer_files(step / "tokenizer.json", saved)
    return hf, run, model


def test_chat_and_candidates_render_with_the_model_template(qwen_ckpt, monkeypatch):
    from llmtrain import chat
    from llmtrain.feedback import candidates

    hf, run, model = qwen_ckpt
    seen = []

    def spy(real):
        def wrapped(model, prompts, sampling, **kw):
            seen.append((prompts, sampling.stop_ids))
            return real(model, prompts, sampling, **kw)
        return wrapped

    monkeypatch.setattr(chat, "generate", spy(chat.generate))
    monkeypatch.setattr(candidates, "generate", spy(candidates.generate))
    session = chat.ChatSession(str(run), SamplingConfig(max_new_tokens=6, temperature=0), device="cpu")
    tok = session.tok
    assert tok.template is not None and session.sampling.stop_ids == tok.stop_ids
    session.reply("Hello there")
    expect = hf.apply_chat_template([{"role": "user", "content": "Hello there"}], tokenize=True, return_dict=False,
                                    add_generation_prompt=True)
    assert seen[-1] == ([expect], tok.stop_ids)
    cands = candidates.sample_candidates(model, tok, [CONVS[0]], 2, SamplingConfig(6, 1.0), torch.Generator().manual_seed(0))
    assert len(cands[0]) == 2 and seen[-1] == ([expect, expect], tok.stop_ids)


def test_reward_dpo_and_sft_inputs_follow_the_model_template(qwen_ckpt):
    hf, run, model = qwen_ckpt
    tok = Tokenizer.load(checkpoint.tokenizer_of(run))
    im_end = tok.tk.token_to_id("<|im_end|>")
    conv = CONVS[0]
    # the reward model reads the answer's end-of-turn token (a cut-off answer: its last word)
    assert encode_answer(tok, conv, "Quite so.", 160)[-1] == im_end
    assert encode_answer(tok, conv, "Quite so.", 160, False)[-1] != im_end
    # DPO: the log-probs of the answer's tokens and its <|im_end|>, as the mask says
    r = Ranking(messages=conv, texts=["Quite so.", "No."], ranks=[1, 2], finished=[True, False])
    logp, starts = answer_logprobs(model, tok, [r], 160, "cpu")
    ids, mask = render_answer(tok, conv, "Quite so.")
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([ids[:-1]])).float(), -1)[0]
    want = sum(lp[p - 1, ids[p]] for p in range(1, len(ids)) if mask[p])
    assert starts == [0] and torch.allclose(logp[0], want, atol=1e-4)
    # SFT: the examples are apply_chat_template's ids with the assistant's tokens to learn
    examples, dropped = encode(tok, [("x.jsonl:1", CONVS[2])], 500)
    assert dropped == 0 and examples[0].ids == hf.apply_chat_template(CONVS[2], tokenize=True, return_dict=False)
    assert examples[0].mask == render_chat(tok, CONVS[2])[1] and sum(examples[0].mask) > 0


def test_a_conversation_the_template_refuses_names_the_data_line_and_the_template(tmp_path):
    step = build(tmp_path, "qwen")[2]
    (step / "chat_template.jinja").write_text(
        "{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
        "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}")
    tok = Tokenizer.load(step)
    assert encode(tok, [("a.jsonl:1", CONVS[2])], 500)[0][0].ids  # alternating: fine
    with pytest.raises(DataError) as e:
        encode(tok, [("a.jsonl:1", CONVS[2]), ("a.jsonl:2", CONVS[1])], 500)
    assert str(e.value) == (f"a.jsonl:2: {step / 'chat_template.jinja'}: the chat template refused the conversation "
                            "(Conversation roles must alternate user/assistant/user/assistant/...)")
