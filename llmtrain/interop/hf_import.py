"""import_hf: a local HF model folder (Llama, Mistral, Qwen2) -> our checkpoint, step 0.

The config is mapped (hf_config), every tensor checked and read as fp32 (hf_weights), and
our special tokens registered (hf_tokenizer); the embedding and lm_head rows of the tokens
that were new start at the mean of the existing rows. The source's dtype, chat template and
tokenizer changes are recorded in the checkpoint's config.json under "source". A source with a
chat template keeps it (chat_template.jinja beside tokenizer.json): every stage renders chats
with it, as transformers' apply_chat_template does; without one, ours is used.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from llmtrain import checkpoint
from llmtrain.config import to_dict
from llmtrain.errors import CheckpointError
from llmtrain.interop.hf_config import family_of, model_config_from_hf, read_json
from llmtrain.interop.hf_tokenizer import import_tokenizer
from llmtrain.interop.hf_weights import expected_shapes, module_with, read_weights, weight_files
from llmtrain.tokenizer import chat_template_from_hf, write_chat_template


def import_hf(src: str | Path, out: str | Path, *, max_seq_len: int = 0) -> dict:
    """Read a local HF model folder into a checkpoint `out/checkpoints/step_0000000/` that every
    stage takes as `init_from` (or `policy`). Returns a summary (see `summary_line`)."""
    src = Path(src)
    if not src.is_dir():
        raise CheckpointError(f"{src}: not a directory (give a local Hugging Face model folder; nothing is downloaded)")
    if checkpoint.step_dirs(out):
        raise CheckpointError(f"{out}: already holds a checkpoint; choose another output directory")
    where = str(src / "config.json")
    hf = read_json(src / "config.json")
    arch, family = family_of(hf, where)
    mcfg = model_config_from_hf(hf, family, where, max_seq_len)
    files = weight_files(src)
    tok_cfg = read_json(src / "tokenizer_config.json", required=False)
    has_template = bool(tok_cfg.get("chat_template")) or (src / "chat_template.jinja").is_file()
    tk, new_tokens, tok_notes = import_tokenizer(src, keep_pretokenizer=has_template)
    tpl = chat_template_from_hf(src, tk.id_to_token) if has_template else None

    head = "score" if arch.endswith("ForSequenceClassification") else "lm_head"
    labels = hf.get("num_labels", len(hf.get("id2label") or {0: "LABEL_0"}))
    if head == "score" and labels != 1:
        raise CheckpointError(f"{where}: a sequence classifier with {labels} labels; a reward model has one output "
                              "(num_labels 1)")
    tensors, dtype = read_weights(files, expected_shapes(mcfg, head), mcfg.tie_embeddings and head == "lm_head")
    src_vocab = mcfg.vocab_size
    # Rows for the tokens we added (new rows, or spare rows past the source tokenizer's): the mean
    # of the existing rows, a neutral start that SFT then moves.
    vocab = max(src_vocab, max(tk.get_vocab(with_added_tokens=True).values()) + 1)
    new_ids = [tk.token_to_id(t) for t in new_tokens]
    heads = ["model.embed_tokens.weight"] + ([] if mcfg.tie_embeddings or head == "score" else ["lm_head.weight"])
    for k in heads:
        w = tensors[k]
        mean = w.mean(0, keepdim=True)
        if vocab > src_vocab:
            w = torch.cat([w, mean.expand(vocab - src_vocab, -1)])
        w[new_ids] = mean
        tensors[k] = w.contiguous()
    mcfg.vocab_size = vocab

    template = tpl.source if tpl is not None else None
    source = {
        "path": str(src.resolve()), "architecture": arch, "family": family, "dtype": str(dtype).removeprefix("torch."),
        "vocab_size": src_vocab, "added_tokens": new_tokens, "max_position_embeddings": hf.get("max_position_embeddings"),
        "chat_template": template, "generation_config": read_json(src / "generation_config.json", required=False),
        "special_tokens": {k: tok_cfg.get(k) for k in ("bos_token", "eos_token", "pad_token") if k in tok_cfg},
        "tokenizer_changes": tok_notes,
    }
    model = module_with(mcfg, tensors, head)
    stage = {"stage": "import"}
    if head == "score":  # a reward model as the reward stage writes one; an export of ours keeps its offset
        offset = float((hf.get("llmtrain") or {}).get("reward_offset", 0.0))
        stage = {"stage": "reward", "reward": {"offset": offset, "std": 1.0}}
    with tempfile.TemporaryDirectory() as tmp:
        tok_path = Path(tmp) / "tokenizer.json"
        tk.save(str(tok_path))
        if tpl is not None:  # the model's own template: every stage renders chats with it
            write_chat_template(Path(tmp), tpl)
        step = checkpoint.save(out, 0, model, config={"model": to_dict(mcfg), **stage, "source": source},
                               meta={"tokens": 0}, tokenizer_path=str(tok_path))
    return {"checkpoint": str(step), "config": mcfg, **source, "n_files": len(files),
            "stop_tokens": list(tpl.stop_tokens) if tpl is not None else []}


def summary_line(s: dict) -> str:
    c = s["config"]
    added = s["added_tokens"]
    tokens = (f"vocab {s['vocab_size']} -> {c.vocab_size}: added {len(added)} special tokens ({' '.join(added)}), "
              "their embedding/lm_head rows set to the mean of the existing rows" if added
              else f"vocab {c.vocab_size} (our special tokens were already there)")
    rope = f"rope theta {c.rope_theta:g}" + (f", llama3 scaling x{c.rope_factor:g}" if c.rope_scaling == "llama3" else "")
    return (f"import: {s['architecture']} from {s['path']} ({s['n_files']} safetensors file(s), {s['dtype']} -> stored fp32)\n"
            f"  {c.n_layers} layers, dim {c.dim}, {c.n_heads} heads / {c.n_kv_heads} kv, ffn {c.ffn_dim}, context "
            f"{c.max_seq_len}, {rope}{', q/k/v biases' if c.attention_bias else ''}"
            f"{', tied embeddings' if c.tie_embeddings else ''}\n"
            f"  {tokens}\n"
            + "".join(f"  tokenizer: {n}\n" for n in s["tokenizer_changes"])
            + ("  chat template: the model's own (chat_template.jinja), used by every stage and by chat; "
               f"answers end at {' or '.join(s['stop_tokens'])}\n" if s["chat_template"] else
               "  chat template: none in the source; ours (<|bos|><|user|>...<|end|><|assistant|>)\n") +
            f"  -> {s['checkpoint']}")
