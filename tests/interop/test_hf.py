"""Hugging Face interop: tiny random models of each supported family, built and saved with
`transformers` itself (nothing downloaded), imported, compared, trained and exported.

Tolerance for logits: fp32, atol 1e-5, rtol 0 (the figure tests/unit/test_model.py uses for
our model against LlamaForCausalLM). Greedy generations must be the same tokens. Round trips
(import -> export) must give every tensor torch.equal to the original.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import WORDS, corpus_slice, write_jsonl
from safetensors.torch import load_file, save_file

from llmtrain import checkpoint
from llmtrain.cli import main as cli_main
from llmtrain.config import (
    LoRAConfig,
    OptimConfig,
    PPOConfig,
    RunConfig,
    SFTConfig,
    SFTDataConfig,
)
from llmtrain.errors import CheckpointError
from llmtrain.generate import SamplingConfig, generate
from llmtrain.interop.hf import CHAT_TEMPLATE, export_hf, import_hf
from llmtrain.metrics import read_metrics
from llmtrain.model import Transformer
from llmtrain.model.heads import ScoreModel
from llmtrain.tokenizer import SPECIAL_TOKENS, Tokenizer, render_chat

transformers = pytest.importorskip("transformers")

ATOL = 1e-5
OURS = list(SPECIAL_TOKENS.values())


# ----------------------------------------------------------------------------- tiny HF models

def family_config(name: str, vocab: int):
    """Tiny configs (hidden 64, 2 layers) of each supported family and feature."""
    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=128)
    if name == "llama-gqa":
        return transformers.LlamaConfig(**common, num_key_value_heads=2, rope_theta=10000.0)
    if name == "llama-tied":
        return transformers.LlamaConfig(**common, num_key_value_heads=4, tie_word_embeddings=True,
                                        rope_theta=500000.0, rms_norm_eps=1e-6)
    if name == "llama3-rope-scaling":
        # head size 16, theta 1e4: wavelengths 6.3, 20, 63, ... around an original context of 32
        # fall in all three bands (kept < 8 < smoothed < 32 < divided by factor)
        return transformers.LlamaConfig(**common, num_key_value_heads=2, rope_theta=10000.0,
                                        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                                          high_freq_factor=4.0, original_max_position_embeddings=32))
    if name == "mistral":
        return transformers.MistralConfig(**common, num_key_value_heads=2, sliding_window=None, rope_theta=10000.0)
    if name == "qwen2-bias":
        return transformers.Qwen2Config(**common, num_key_value_heads=2, use_sliding_window=False, rope_theta=1e6)
    if name == "qwen2-bias-tied":
        return transformers.Qwen2Config(**common, num_key_value_heads=1, use_sliding_window=False, rope_theta=1e6,
                                        tie_word_embeddings=True)
    raise KeyError(name)


FAMILIES = ["llama-gqa", "llama-tied", "llama3-rope-scaling", "mistral", "qwen2-bias", "qwen2-bias-tied"]


def hf_tokenizer(out: Path, with_ours: bool) -> int:
    """A tiny byte-level BPE with Llama-style <s> </s> (and optionally our special tokens), saved
    as tokenizer.json + tokenizer_config.json with a chat template of its own. -> vocab size."""
    from tokenizers import Tokenizer as HFTok
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    tk = HFTok(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    specials = ["<s>", "</s>"] + (OURS if with_ours else [])
    tk.train_from_iterator(corpus_slice(30_000).split("\n"),
                           trainer=trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    out.mkdir(parents=True, exist_ok=True)
    tk.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
        "chat_template": "{% for m in messages %}[{{ m['role'] }}]\n{{ m['content'] }}</s>{% endfor %}"
                         "{% if add_generation_prompt %}[assistant]\n{% endif %}"}))
    return tk.get_vocab_size()


def randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """HF initialises biases to zero and norms to one: randomise every tensor, so each is tested."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.1 * noise if name.endswith("norm.weight") else 0.08 * noise)


def make_hf_model(out: Path, family: str, with_ours: bool = False, dtype=torch.float32, **save_kw):
    """A tiny random HF model of `family`, saved to `out` with its tokenizer. -> the model (eval)."""
    vocab = hf_tokenizer(out, with_ours)
    cfg = family_config(family, vocab)
    cls = {"llama": transformers.LlamaForCausalLM, "mistral": transformers.MistralForCausalLM,
           "qwen2": transformers.Qwen2ForCausalLM}[cfg.model_type]
    model = cls(cfg).eval()
    randomize(model)
    model.to(dtype).save_pretrained(out, **save_kw)
    return model


def load_ours(ckpt) -> Transformer:
    model = Transformer(checkpoint.model_config(ckpt))
    checkpoint.load_weights(ckpt, model)
    return model.eval()


def hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    """transformers' own generate, greedy, no stop token: the n new tokens."""
    out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                         do_sample=False, max_new_tokens=n, min_new_tokens=n, eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ----------------------------------------------------------------------------- parity per family

@pytest.mark.parametrize("family", FAMILIES)
def test_imported_family_matches_transformers(family, tmp_path):
    """Logits (atol 1e-5) and 24 greedy tokens equal transformers' on the same weights; our
    special tokens were added with mean rows, the source rows untouched."""
    src, run = tmp_path / "hf", tmp_path / "ckpt"
    hf = make_hf_model(src, family)
    summary = import_hf(src, run)
    ours = load_ours(run)
    V = hf.config.vocab_size
    assert summary["added_tokens"] == OURS and ours.config.vocab_size == V + len(OURS)

    x = torch.randint(0, V, (2, 100), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = ours(x), hf(x).logits
    diff = (a[..., :V] - b).abs().max().item()
    print(f"{family}: max |logit difference| {diff:.2e} over {tuple(b.shape)}")
    torch.testing.assert_close(a[..., :V], b, atol=ATOL, rtol=0)
    emb = ours.model.embed_tokens.weight
    assert torch.equal(emb[:V], hf.model.embed_tokens.weight)
    assert torch.allclose(emb[V:], hf.model.embed_tokens.weight.mean(0).expand(len(OURS), -1))

    prompt = x[0, :12].tolist()
    mine = generate(ours, [prompt], SamplingConfig(max_new_tokens=24, temperature=0.0))[0]
    assert mine == hf_greedy(hf, prompt, 24)


def test_llama3_rope_scaling_changes_the_tables(tmp_path):
    """The llama3 case above is not vacuous: without the scaling the logits differ."""
    src, run = tmp_path / "hf", tmp_path / "ckpt"
    hf = make_hf_model(src, "llama3-rope-scaling")
    import_hf(src, run)
    cfg = checkpoint.model_config(run)
    assert cfg.rope_scaling == "llama3" and cfg.rope_original_max_len == 32
    cfg.rope_scaling = "none"
    plain = Transformer(cfg)
    checkpoint.load_weights(run, plain)
    x = torch.randint(0, hf.config.vocab_size, (1, 100), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (plain.eval()(x)[..., :hf.config.vocab_size] - hf(x).logits).abs().max() > 1e-3


def test_sharded_checkpoint_with_index(tmp_path):
    src, run = tmp_path / "hf", tmp_path / "ckpt"
    hf = make_hf_model(src, "llama-gqa", max_shard_size="40KB")
    index = json.loads((src / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 2 and not (src / "model.safetensors").exists()
    summary = import_hf(src, run)
    assert summary["n_files"] == len(shards)
    x = torch.randint(0, hf.config.vocab_size, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(load_ours(run)(x)[..., :hf.config.vocab_size], hf(x).logits, atol=ATOL, rtol=0)


# ----------------------------------------------------------------------------- round trips

@pytest.mark.parametrize("family", FAMILIES)
def test_import_export_round_trip_is_bit_for_bit(family, tmp_path):
    """With a tokenizer that already has our special tokens nothing is added: HF -> ours -> HF
    gives every tensor torch.equal and the same model config."""
    src = tmp_path / "hf"
    make_hf_model(src, family, with_ours=True)
    import_hf(src, tmp_path / "ckpt")
    export_hf(tmp_path / "ckpt", tmp_path / "out")
    before = {}
    for f in src.glob("*.safetensors"):
        before.update(load_file(str(f)))
    after = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert set(after) == set(before)
    assert all(after[k].dtype == before[k].dtype and torch.equal(after[k], before[k]) for k in before)

    a = transformers.AutoConfig.from_pretrained(src)
    b = transformers.AutoConfig.from_pretrained(tmp_path / "out")
    fields = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings", "hidden_act"]
    fields += ["rope_parameters"] if hasattr(a, "rope_parameters") else ["rope_theta", "rope_scaling"]  # 5.x / 4.x
    assert {f: getattr(b, f) for f in fields} == {f: getattr(a, f) for f in fields}
    # Mistral without a sliding window is Llama: exported as Llama (see docs/huggingface.md)
    assert b.model_type == {"mistral": "llama"}.get(a.model_type, a.model_type)


def test_bf16_source_round_trips_in_its_dtype(tmp_path):
    """Stored fp32 inside (upcasting is exact), exported back as bf16: equal bits."""
    src = tmp_path / "hf"
    make_hf_model(src, "llama-gqa", with_ours=True, dtype=torch.bfloat16)
    summary = import_hf(src, tmp_path / "ckpt")
    assert summary["dtype"] == "bfloat16"
    inside = load_file(str(checkpoint.resolve(tmp_path / "ckpt") / "model.safetensors"))
    assert all(t.dtype == torch.float32 for t in inside.values())
    export_hf(tmp_path / "ckpt", tmp_path / "out")
    before, after = load_file(str(src / "model.safetensors")), load_file(str(tmp_path / "out" / "model.safetensors"))
    assert all(after[k].dtype == torch.bfloat16 and torch.equal(after[k], before[k]) for k in before)


def test_transformers_4_style_config_reads_the_same(tmp_path):
    """config.json files written by transformers 4.x carry rope_theta/rope_scaling/torch_dtype
    instead of 5.x's rope_parameters/dtype; both give the same model config."""
    src = tmp_path / "hf"
    make_hf_model(src, "llama3-rope-scaling")
    import_hf(src, tmp_path / "v5")
    conf = json.loads((src / "config.json").read_text())
    if "rope_parameters" in conf:  # saved by transformers 5.x: rewrite as 4.x would have
        rope = conf.pop("rope_parameters")
        conf["rope_theta"] = rope.pop("rope_theta")
        conf["rope_scaling"] = rope
        conf["torch_dtype"] = conf.pop("dtype")
    rope = conf["rope_scaling"]
    conf["rope_scaling"] = {"type" if k == "rope_type" else k: v for k, v in rope.items()}  # the oldest spelling
    (src / "config.json").write_text(json.dumps(conf))
    import_hf(src, tmp_path / "v4")
    assert checkpoint.model_config(tmp_path / "v4") == checkpoint.model_config(tmp_path / "v5")


# ----------------------------------------------------------------------------- refusals

def _saved_llama(tmp_path) -> Path:
    src = tmp_path / "hf"
    make_hf_model(src, "llama-gqa")
    return src


def _edit_config(src: Path, **changes) -> None:
    conf = json.loads((src / "config.json").read_text())
    conf.update(changes)
    (src / "config.json").write_text(json.dumps(conf))


def test_unsupported_architecture_is_named(tmp_path):
    src = tmp_path / "gpt2"
    hf_tokenizer(src, False)
    transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=300, n_embd=32, n_layer=1, n_head=2,
                                                         n_positions=32)).save_pretrained(src)
    with pytest.raises(CheckpointError, match=r"'architectures' is GPT2LMHeadModel, which is not supported"):
        import_hf(src, tmp_path / "ckpt")


@pytest.mark.parametrize("changes, key", [
    ({"intermediate_size": 128}, r"'model\.layers\.0\.mlp\.down_proj\.weight' has shape \(64, 96\), config\.json implies \(64, 128\)"),
    ({"head_dim": 8}, r"'head_dim' is 8"),
    ({"hidden_act": "gelu"}, r"'hidden_act' is gelu"),
    ({"attention_bias": True}, r"'attention_bias' is true"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}}, r"'rope_scaling' type 'yarn'"),
    ({"architectures": ["LlamaForCausalLM"], "model_type": "gemma"}, r"'model_type' is gemma"),
])
def test_config_it_cannot_compute_is_refused_by_key(tmp_path, changes, key):
    src = _saved_llama(tmp_path)
    _edit_config(src, **changes)
    with pytest.raises(CheckpointError, match=key):
        import_hf(src, tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()  # nothing half-written


def test_missing_and_unexpected_tensors_are_named(tmp_path):
    src = _saved_llama(tmp_path)
    w = load_file(str(src / "model.safetensors"))
    gone = w.pop("model.layers.1.self_attn.k_proj.weight")
    save_file(w, str(src / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"tensor 'model\.layers\.1\.self_attn\.k_proj\.weight' is missing"):
        import_hf(src, tmp_path / "a")
    w["model.layers.1.self_attn.k_proj.weight"] = gone
    w["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(64)
    save_file(w, str(src / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'model\.layers\.0\.self_attn\.q_proj\.bias'"):
        import_hf(src, tmp_path / "b")


def test_mistral_sliding_window_shorter_than_the_context(tmp_path):
    src = tmp_path / "hf"
    make_hf_model(src, "mistral")
    _edit_config(src, sliding_window=32)
    with pytest.raises(CheckpointError, match=r"'sliding_window' is 32, shorter than the context 128"):
        import_hf(src, tmp_path / "a")
    import_hf(src, tmp_path / "b", max_seq_len=32)  # within the window it is plain attention
    assert checkpoint.model_config(tmp_path / "b").max_seq_len == 32


def test_pickled_weights_and_missing_tokenizer_are_refused(tmp_path):
    src = _saved_llama(tmp_path)
    (src / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match="no tokenizer.json"):
        import_hf(src, tmp_path / "a")
    src2 = tmp_path / "bin"
    src2.mkdir()
    shutil.copy(src / "config.json", src2)
    (src / "model.safetensors").rename(src2 / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"pickled \(pytorch_model\*\.bin\)"):
        import_hf(src2, tmp_path / "b")


def test_cli_import_and_export(tmp_path, capsys):
    src = _saved_llama(tmp_path)
    assert cli_main(["import", str(src), "-o", str(tmp_path / "ckpt")]) == 0
    out = capsys.readouterr().out
    assert "LlamaForCausalLM" in out and "added 7 special tokens" in out and "mean of the existing rows" in out
    conf = checkpoint.read_config(tmp_path / "ckpt")
    assert conf["stage"] == "import" and conf["source"]["architecture"] == "LlamaForCausalLM"
    assert conf["source"]["path"] == str(src.resolve()) and conf["source"]["chat_template"].startswith("{% for m")
    assert cli_main(["export", str(tmp_path / "ckpt"), "-o", str(tmp_path / "out")]) == 0
    assert "as LlamaForCausalLM" in capsys.readouterr().out
    assert cli_main(["import", str(tmp_path / "nowhere"), "-o", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("llmtrain import: error:") and "nowhere" in err and len(err.splitlines()) == 1


# ----------------------------------------------------------------------------- our models in transformers

CONVERSATIONS = [
    [{"role": "user", "content": "How are you?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tea or coffee?"},
     {"role": "assistant", "content": "Tea, naturally."}, {"role": "user", "content": "Why  so,  é?\n"}],
]


def assert_chat_template_matches(tok: Tokenizer, hf_tok) -> None:
    for conv in CONVERSATIONS:
        for gen_prompt in (True, False):
            ids = hf_tok.apply_chat_template(conv, add_generation_prompt=gen_prompt, tokenize=True, return_dict=False)
            assert list(ids) == render_chat(tok, conv, add_generation_prompt=gen_prompt)[0]


def test_export_of_our_pretrained_model_generates_like_llmtrain_generate(pretrained, tmp_path, capsys):
    """The issue's check: transformers loads an exported model trained by our code and writes the
    same greedy text as `llmtrain generate --greedy` on the same prompt."""
    out = tmp_path / "hf"
    assert cli_main(["export", str(pretrained), "-o", str(out)]) == 0
    capsys.readouterr()
    prompt, n = "How are you", 20
    assert cli_main(["generate", str(pretrained), "--prompt", prompt, "--greedy", "--max-new-tokens", str(n)]) == 0
    ours_text = capsys.readouterr().out.rstrip("\n")

    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    enc = hf_tok(prompt, return_tensors="pt")  # <|bos|> comes first, as `llmtrain generate` puts it
    tok = Tokenizer.load(checkpoint.tokenizer_of(pretrained))
    assert enc["input_ids"][0].tolist() == [tok.bos_id, *tok.encode(prompt)]
    gen = hf.generate(**enc, do_sample=False, max_new_tokens=n)  # stops at <|eos|>/<|end|> (generation_config.json)
    hf_text = prompt + hf_tok.decode(gen[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    print(f"llmtrain generate: {ours_text!r}\ntransformers:      {hf_text!r}")
    assert hf_text == ours_text and len(ours_text) > len(prompt)
    assert_chat_template_matches(tok, hf_tok)
    with torch.no_grad():  # and the logits, not only the argmax
        x = torch.tensor([render_chat(tok, CONVERSATIONS[1])[0]])
        torch.testing.assert_close(hf(x).logits, load_ours(pretrained)(x), atol=ATOL, rtol=0)


def test_sft_from_an_imported_model_then_export(tmp_path):
    """Import a tiny Llama (our special tokens added), fine-tune it with our SFT stage, export it:
    the held-out loss falls, and transformers with the exported chat template (the source's own,
    kept through import, SFT and export) answers exactly as our chat rendering + generate do."""
    src = tmp_path / "hf"
    make_hf_model(src, "llama-tied")
    import_hf(src, tmp_path / "imported")
    rows = [{"prompt": f"Tell me about the {w} {i}", "response": f"Indeed, the {w} is splendid."}
            for i, w in zip(range(60), WORDS * 3)]
    data = write_jsonl(tmp_path / "sft.jsonl", rows)
    from llmtrain.stages import sft

    cfg = SFTConfig(init_from=str(tmp_path / "imported"), data=SFTDataConfig(train=str(data), val_every=5),
                    optim=OptimConfig(lr=1e-2, warmup_steps=2, weight_decay=0.0),
                    run=RunConfig(out_dir=str(tmp_path / "sft"), max_steps=30, batch_size=8, log_every=10,
                                  eval_every=15, seed=0, threads=1), sample_prompts=1, sample_tokens=6)
    sft.main(cfg)
    val = [r["loss"] for r in read_metrics(tmp_path / "sft", "val")]
    print(f"held-out response loss of the imported model: {' -> '.join(f'{v:.3f}' for v in val)}")
    assert val[-1] < 0.7 * val[0]

    export_hf(tmp_path / "sft", tmp_path / "out")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    tok = Tokenizer.load(checkpoint.tokenizer_of(tmp_path / "sft"))
    assert_chat_template_matches(tok, hf_tok)
    conv = [{"role": "user", "content": "Tell me about the candle 7"}]
    ids = hf_tok.apply_chat_template(conv, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    gen = hf.generate(**ids, do_sample=False, max_new_tokens=12)[0, ids["input_ids"].shape[1]:].tolist()
    assert tok.template is not None  # the source's template, kept from the import through SFT
    s = SamplingConfig(max_new_tokens=12, temperature=0.0, stop_ids=tok.stop_ids)
    mine = generate(load_ours(tmp_path / "sft"), [render_chat(tok, conv, add_generation_prompt=True)[0]], s,
                    pad_id=tok.pad_id)[0]
    print(f"answer: {tok.decode(mine)!r}")
    assert gen == mine and tok.decode(mine).startswith("Indeed, the")


def test_sentencepiece_style_tokenizer_keeps_the_chat_template_exact(tmp_path):
    """Llama 2 / Mistral tokenizers put "▁" before a text's first piece only (Metaspace, prepend
    "first"), which would make apply_chat_template differ from render_chat; import switches it to
    "always": plain text tokenizes as before, and the exported template gives render_chat's ids."""
    from tokenizers import Tokenizer as HFTok
    from tokenizers import decoders, models, pre_tokenizers, trainers

    src = tmp_path / "hf"
    src.mkdir()
    tk = HFTok(models.BPE(byte_fallback=True))
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tk.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tk.train_from_iterator(corpus_slice(30_000).split("\n"),
                           trainer=trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"]))
    tk.save(str(src / "tokenizer.json"))
    cfg = family_config("mistral", tk.get_vocab_size())
    transformers.MistralForCausalLM(cfg).save_pretrained(src)
    summary = import_hf(src, tmp_path / "ckpt")
    assert summary["tokenizer_changes"] and "always" in summary["tokenizer_changes"][0]
    tok = Tokenizer.load(checkpoint.tokenizer_of(tmp_path / "ckpt"))
    for text in ["How are you?", " Two  spaces and a tab\t.", "Why  so,  é?\n"]:
        assert tok.encode(text) == tk.encode(text, add_special_tokens=False).ids
        assert tok.decode(tok.encode(text)) == tk.decode(tk.encode(text, add_special_tokens=False).ids)
    export_hf(tmp_path / "ckpt", tmp_path / "out")
    assert_chat_template_matches(tok, transformers.AutoTokenizer.from_pretrained(tmp_path / "out"))


# ----------------------------------------------------------------------------- reward model, classifier, LoRA

@pytest.fixture(scope="module")
def rm_ckpt(pretrained, tmp_path_factory):
    """A reward-model checkpoint: a random score head on the pretrained backbone, offset 0.25."""
    out = tmp_path_factory.mktemp("rm") / "run"
    torch.manual_seed(0)
    model = ScoreModel(checkpoint.model_config(pretrained), 1)
    checkpoint.load_weights(pretrained, model, new_head=("score.",))
    checkpoint.save(out, 1, model, config={"model": vars(model.config), "stage": "reward",
                                           "reward": {"offset": 0.25, "std": 1.0}},
                    meta={"tokens": 0}, tokenizer_path=str(checkpoint.tokenizer_of(pretrained)))
    return out


@pytest.fixture(scope="module")
def classify_ckpt(pretrained, tmp_path_factory):
    """A classifier checkpoint: three labels, a random head on the pretrained backbone."""
    out = tmp_path_factory.mktemp("cls") / "run"
    torch.manual_seed(1)
    model = ScoreModel(checkpoint.model_config(pretrained), 3)
    checkpoint.load_weights(pretrained, model, new_head=("score.",))
    checkpoint.save(out, 1, model, config={"model": vars(model.config), "stage": "classify",
                                           "labels": ["tea", "weather", "music"]},
                    meta={"tokens": 0}, tokenizer_path=str(checkpoint.tokenizer_of(pretrained)))
    return out


@pytest.mark.parametrize("kind", ["reward", "classify"])
def test_score_models_export_as_sequence_classification(kind, rm_ckpt, classify_ckpt, tmp_path):
    """A reward model becomes LlamaForSequenceClassification with one label and pad_token_id set
    (its offset recorded); a classifier keeps its label names. Scores equal ours on a right-
    padded batch (HF reads the last non-pad token, we the last real one)."""
    ckpt, n = (rm_ckpt, 1) if kind == "reward" else (classify_ckpt, 3)
    export_hf(ckpt, tmp_path / "rm")
    conf = json.loads((tmp_path / "rm" / "config.json").read_text())
    assert conf["architectures"] == ["LlamaForSequenceClassification"]
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "rm")
    assert hf.config.num_labels == n and hf.config.pad_token_id == hf_tok.pad_token_id is not None
    if kind == "reward":
        assert conf["llmtrain"]["reward_offset"] == 0.25
    else:
        assert [hf.config.id2label[i] for i in range(3)] == ["tea", "weather", "music"]
    convs = [CONVERSATIONS[0] + [{"role": "assistant", "content": a}] for a in ("Quite well.", "Splendid, old chap, splendid.")]
    batch = hf_tok.apply_chat_template(convs, padding=True, return_tensors="pt", return_dict=True)
    assert batch["attention_mask"].min() == 0  # one row is padded (on the right)
    ours = ScoreModel(checkpoint.model_config(ckpt), n)
    checkpoint.load_weights(ckpt, ours)
    lengths = batch["attention_mask"].sum(1)
    with torch.no_grad():
        torch.testing.assert_close(hf(**batch).logits, ours.eval()(batch["input_ids"], lengths), atol=ATOL, rtol=0)


def test_a_hugging_face_reward_model_imports_as_ours(rm_ckpt, classify_ckpt, tmp_path):
    """A ...ForSequenceClassification with one label (here our reward model exported, then
    imported back) becomes a reward checkpoint that PPO's reward_model and `reward score` take:
    same scores on the same texts, its offset kept. More labels are refused, naming the file."""
    from llmtrain.scoring import load_reward_model, score_texts

    export_hf(rm_ckpt, tmp_path / "hf-rm")
    summary = import_hf(tmp_path / "hf-rm", tmp_path / "back")
    assert summary["architecture"] == "LlamaForSequenceClassification"
    items = [(CONVERSATIONS[0], a, True) for a in ("Quite well.", "Splendid, old chap, splendid.")]
    ours, tok, norm = load_reward_model(rm_ckpt)
    back, tok_back, norm_back = load_reward_model(tmp_path / "back")
    assert norm_back["offset"] == norm["offset"] == 0.25
    assert score_texts(back, tok_back, items, offset=0.25) == score_texts(ours, tok, items, offset=0.25)
    export_hf(classify_ckpt, tmp_path / "hf-cls")
    with pytest.raises(CheckpointError, match=r"hf-cls/config.json: a sequence classifier with 3 labels"):
        import_hf(tmp_path / "hf-cls", tmp_path / "cls-back")


def test_ppo_lora_exports_as_a_peft_adapter(pretrained, rm_ckpt, tmp_path, monkeypatch):
    """A real (two-iteration) PPO run with LoRA; its adapter loads in peft on the exported base
    and gives the logits of our merged policy."""
    peft = pytest.importorskip("peft")
    from llmtrain.stages import ppo

    tok = Tokenizer.load(checkpoint.tokenizer_of(pretrained))
    target = tok.encode("!")[0]
    monkeypatch.setattr(ppo, "score_texts", lambda m, t, items, batch_size=32, offset=0.0:
                        [float(sum(x == target for x in tok.encode(it[1]))) for it in items])
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"Say something about the {w}"} for w in WORDS])
    cfg = PPOConfig(policy=str(pretrained), reward_model=str(rm_ckpt), prompts=str(prompts), val_every=10, eval_prompts=2,
                    rollout_batch=8, max_new_tokens=8, minibatch=4, ppo_epochs=1,
                    lora=LoRAConfig(enabled=True, r=4, alpha=8.0, targets=["q_proj", "v_proj", "down_proj"]),
                    optim=OptimConfig(lr=1e-2, warmup_steps=0, weight_decay=0.0, schedule="constant"),
                    run=RunConfig(out_dir=str(tmp_path / "ppo"), max_steps=2, eval_every=0, log_every=1, seed=0, threads=1))
    ppo.main(cfg)
    export_hf(tmp_path / "ppo", tmp_path / "adapter", adapter=True)
    adapter = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.0.mlp.down_proj.lora_B.weight" in adapter
    assert any(k.endswith("lora_B.weight") and v.abs().max() > 0 for k, v in adapter.items())  # PPO moved it

    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "adapter" / "base").eval()
    x = torch.tensor([render_chat(tok, CONVERSATIONS[1])[0]])
    with torch.no_grad():
        base_logits = base(x).logits.clone()
        with_adapter = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
        got = with_adapter(x).logits
        want = load_ours(tmp_path / "ppo")(x)
    assert (want - base_logits).abs().max() > 1e-4  # the adapter matters
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    with pytest.raises(CheckpointError, match=r"needs an RL \(ppo, grpo, rloo\) checkpoint"):
        export_hf(pretrained, tmp_path / "no", adapter=True)


def test_chat_template_constant_is_the_one_exported(pretrained, tmp_path):
    export_hf(pretrained, tmp_path / "hf")
    conf = json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())
    assert conf["chat_template"] == CHAT_TEMPLATE
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    with pytest.raises(Exception, match="roles are system, user and assistant"):
        hf_tok.apply_chat_template([{"role": "tool", "content": "x"}])
