"""Hugging Face interop: local HF model folders in, HF model folders out. Nothing is downloaded.

    import_hf(DIR, CKPT)   config.json + safetensors (one file or shards with an index) +
                           tokenizer.json of a Llama, Mistral or Qwen2 model -> our checkpoint
    export_hf(CKPT, DIR)   our checkpoint -> a folder `AutoModelForCausalLM` / `AutoTokenizer`
                           load as they are (a reward or classifier checkpoint: a sequence-
                           classification model); `adapter=True`: a PPO run's LoRA as a peft adapter

Our parameter names are Hugging Face Llama's, so weights move without a renaming table; what
this module does is map the configs, check every key and shape, and reconcile the tokenizer:

- Families: Llama 2/3 (GQA, tied embeddings, Llama 3.1's "llama3" rope scaling), Mistral (with
  no sliding window, or one at least as long as the context used) and Qwen2 (q/k/v biases).
  Anything else is refused with the key that makes it unsupported.
- Our stages need our special tokens (`tokenizer.SPECIAL_TOKENS`: pad, bos, eos and the chat
  roles). Those a source tokenizer lacks are added as new tokens; their rows in the embedding
  and lm_head start at the mean of the model's existing rows. The model's own bos/eos are not
  reused: `Tokenizer` finds the special tokens by their text, so a second name for each would
  need a mapping in every stage. The source's chat template is kept in config.json for
  reference; our stages use the one template of `render_chat`, and exports carry it as Jinja.
- Imports are stored in fp32 (what every stage trains in; upcasting bf16/fp16 is exact) and the
  source dtype is recorded, so exporting an untouched import restores every tensor bit for bit.

Only `tokenizers`, `safetensors` and `torch` are used: transformers and peft are not needed to
import or export, only to use the result (and in the tests that check it).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tokenizers import AddedToken, processors
from tokenizers import Tokenizer as HFTokenizer

from llmtrain import checkpoint
from llmtrain.config import ModelConfig, to_dict
from llmtrain.errors import CheckpointError
from llmtrain.files import publish
from llmtrain.model import Transformer
from llmtrain.model.heads import ScoreModel
from llmtrain.tokenizer import SPECIAL_TOKENS, Tokenizer

# architecture in config.json -> our family name (model_type)
ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SCORE_STAGES = ("reward", "classify")  # checkpoints with a `score` head instead of `lm_head`

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


# ----------------------------------------------------------------------------- import

def _read_json(path: Path, required: bool = True) -> dict:
    if not path.is_file():
        if required:
            raise CheckpointError(f"{path}: not found")
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:  # ValueError: bad JSON or not UTF-8
        raise CheckpointError(f"{path}: unreadable JSON ({type(e).__name__})") from None


def family_of(hf: dict, where: str) -> tuple[str, str]:
    """-> (architecture, family) of a config.json, or an error naming what is unsupported."""
    archs = hf.get("architectures") or []
    if len(archs) > 1:
        raise CheckpointError(f"{where}: 'architectures' lists several ({', '.join(archs)}); expected one")
    arch = archs[0] if archs else ""
    if arch and arch not in ARCHITECTURES:
        raise CheckpointError(f"{where}: 'architectures' is {arch}, which is not supported "
                              f"(supported: {', '.join(ARCHITECTURES)})")
    model_type = hf.get("model_type", "")
    family = ARCHITECTURES.get(arch, model_type)
    if family not in ARCHITECTURES.values() or (model_type and model_type != family):
        raise CheckpointError(f"{where}: 'model_type' is {model_type or 'missing'!s}, which is not supported "
                              f"(supported: {', '.join(sorted(set(ARCHITECTURES.values())))})")
    return arch or next(a for a, f in ARCHITECTURES.items() if f == family), family


def _rope(hf: dict) -> tuple[float, dict]:
    """(theta, scaling) from either transformers 5's `rope_parameters` or 4.x's `rope_theta` +
    `rope_scaling` (where the type was once called `type`)."""
    params = hf.get("rope_parameters")
    if isinstance(params, dict) and "full_attention" in params:  # per-layer-type form
        params = params["full_attention"]
    if isinstance(params, dict):
        theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
        scaling = params if params.get("rope_type", params.get("type", "default")) != "default" else {}
    else:
        theta = hf.get("rope_theta", 10000.0)
        scaling = hf.get("rope_scaling") or {}
    return float(theta), scaling


def model_config_from_hf(hf: dict, family: str, where: str, max_seq_len: int = 0) -> ModelConfig:
    """Our ModelConfig for an HF config.json of a supported family; any setting we cannot compute
    exactly is an error naming its key."""
    def need(key):
        if key not in hf or hf[key] is None:
            raise CheckpointError(f"{where}: '{key}' is missing")
        return hf[key]

    dim, n_heads = int(need("hidden_size")), int(need("num_attention_heads"))
    n_kv = int(hf.get("num_key_value_heads") or n_heads)
    ctx = int(need("max_position_embeddings"))
    if max_seq_len:
        if max_seq_len > ctx:
            raise CheckpointError(f"{where}: max_seq_len {max_seq_len} is beyond 'max_position_embeddings' {ctx}")
        ctx = max_seq_len
    if hf.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"{where}: 'hidden_act' is {hf['hidden_act']}; only silu (SwiGLU) is supported")
    head_dim = hf.get("head_dim")
    if head_dim is not None and head_dim != dim // n_heads:
        raise CheckpointError(f"{where}: 'head_dim' is {head_dim}, not hidden_size / num_attention_heads = "
                              f"{dim // n_heads}; such models are not supported")
    if family == "llama":
        if hf.get("attention_bias"):
            raise CheckpointError(f"{where}: 'attention_bias' is true (a bias on o_proj too): not supported; "
                                  "q/k/v-only biases are Qwen2's layout")
        if hf.get("mlp_bias"):
            raise CheckpointError(f"{where}: 'mlp_bias' is true: not supported")
    if family == "mistral" or (family == "qwen2" and hf.get("use_sliding_window")):
        window = hf.get("sliding_window")
        if window is not None and window < ctx:
            raise CheckpointError(f"{where}: 'sliding_window' is {window}, shorter than the context {ctx}; sliding-"
                                  f"window attention is not implemented (import with a context of at most {window})")
    if (hf.get("partial_rotary_factor") or 1.0) != 1.0:
        raise CheckpointError(f"{where}: 'partial_rotary_factor' is {hf['partial_rotary_factor']}: not supported")
    theta, scaling = _rope(hf)
    rope = dict(rope_scaling="none")
    if scaling:
        kind = scaling.get("rope_type", scaling.get("type"))
        if kind != "llama3":
            raise CheckpointError(f"{where}: 'rope_scaling' type {kind!r} is not supported (only llama3)")
        try:
            rope = dict(rope_scaling="llama3", rope_factor=float(scaling["factor"]),
                        rope_low_freq_factor=float(scaling["low_freq_factor"]),
                        rope_high_freq_factor=float(scaling["high_freq_factor"]),
                        rope_original_max_len=int(scaling["original_max_position_embeddings"]))
        except KeyError as e:
            raise CheckpointError(f"{where}: 'rope_scaling' lacks {e}") from None
    try:
        return ModelConfig(
            vocab_size=int(need("vocab_size")), dim=dim, n_layers=int(need("num_hidden_layers")), n_heads=n_heads,
            n_kv_heads=n_kv, ffn_dim=int(need("intermediate_size")), max_seq_len=ctx, rope_theta=theta,
            norm_eps=float(hf.get("rms_norm_eps", 1e-6)), tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            init_std=float(hf.get("initializer_range", 0.02)), attention_bias=family == "qwen2", **rope,
        ).resolved()
    except CheckpointError:
        raise
    except Exception as e:  # ConfigError from resolved(), or a value of the wrong type
        raise CheckpointError(f"{where}: {e}") from None


def weight_files(src: Path) -> list[Path]:
    """The safetensors files of an HF folder: the shards its index names, or model.safetensors."""
    index = src / "model.safetensors.index.json"
    if index.is_file():
        wm = _read_json(index).get("weight_map")
        if not isinstance(wm, dict) or not wm:
            raise CheckpointError(f"{index}: no 'weight_map'")
        files = [src / f for f in dict.fromkeys(wm.values())]
        for f in files:
            if not f.is_file():
                raise CheckpointError(f"{index}: names {f.name}, which is missing")
        return files
    if (src / "model.safetensors").is_file():
        return [src / "model.safetensors"]
    if any(src.glob("pytorch_model*.bin")):
        raise CheckpointError(f"{src}: weights are pickled (pytorch_model*.bin); only safetensors are read, since "
                              "unpickling can run code. Convert once with transformers' save_pretrained()")
    raise CheckpointError(f"{src}: no model.safetensors or model.safetensors.index.json")


def expected_shapes(mcfg: ModelConfig, head: str = "lm_head", n_out: int = 1) -> dict[str, tuple]:
    """Name -> shape of every tensor our model of `mcfg` holds (a tied lm_head left out).
    Built on the meta device: no memory, no initialisation."""
    with torch.device("meta"):
        model = ScoreModel(mcfg, n_out) if head == "score" else Transformer(mcfg)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if head == "lm_head" and mcfg.resolved().tie_embeddings:
        shapes.pop("lm_head.weight")
    return shapes


def read_weights(files: list[Path], shapes: dict[str, tuple], tied: bool) -> tuple[dict[str, torch.Tensor], torch.dtype]:
    """Every tensor `shapes` names from the files, checked by name and shape; -> (fp32 tensors,
    the dtype they were stored in)."""
    out, dtypes = {}, set()
    for f in files:
        with safe_open(str(f), framework="pt", device="cpu") as sf:
            for k in sf.keys():  # noqa: SIM118 (safe_open is not a dict)
                if k.endswith("rotary_emb.inv_freq"):  # a buffer some older checkpoints saved
                    continue
                if tied and k == "lm_head.weight":  # tied: HF reads embed_tokens there anyway
                    continue
                if k not in shapes:
                    raise CheckpointError(f"{f}: unexpected tensor '{k}' (not part of a supported model of this config)")
                shape = tuple(sf.get_slice(k).get_shape())
                if shape != shapes[k]:
                    raise CheckpointError(f"{f}: '{k}' has shape {shape}, config.json implies {shapes[k]}")
                t = sf.get_tensor(k)
                dtypes.add(t.dtype)
                out[k] = t.float()
    missing = [k for k in shapes if k not in out]
    if missing:
        raise CheckpointError(f"{files[0].parent}: tensor '{missing[0]}' is missing"
                              + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    if len(dtypes) > 1:
        raise CheckpointError(f"{files[0].parent}: tensors are stored in several dtypes ({sorted(map(str, dtypes))})")
    return out, dtypes.pop()


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


def import_tokenizer(src: Path):
    """The source tokenizer with every special token of ours registered; -> (tokenizer, the
    tokens that were new, notes on what else changed). Truncation and padding the file may
    carry are switched off.

    SentencePiece-style tokenizers (Llama 2, Mistral) put their "▁" before the first piece of a
    text only ("first"). `render_chat` encodes each message alone, so each starts a text and
    gets one; HF's apply_chat_template encodes the rendered string, where a message follows a
    special token and would get none: the two would tokenize the same chat differently. With
    "always" each stretch between special tokens starts with "▁", which is what we encode;
    a text without special tokens tokenizes exactly as before."""
    path = src / "tokenizer.json"
    if not path.is_file():
        raise CheckpointError(f"{src}: no tokenizer.json (a fast tokenizer); write one with transformers: "
                              "AutoTokenizer.from_pretrained(DIR).save_pretrained(DIR)")
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
        notes, changed = [], []
        for part in ("pre_tokenizer", "decoder"):
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


def import_hf(src: str | Path, out: str | Path, *, max_seq_len: int = 0) -> dict:
    """Read a local HF model folder into a checkpoint `out/checkpoints/step_0000000/` that every
    stage takes as `init_from` (or `policy`). Returns a summary (see `summary_line`)."""
    src = Path(src)
    if not src.is_dir():
        raise CheckpointError(f"{src}: not a directory (give a local Hugging Face model folder; nothing is downloaded)")
    if checkpoint.step_dirs(out):
        raise CheckpointError(f"{out}: already holds a checkpoint; choose another output directory")
    where = str(src / "config.json")
    hf = _read_json(src / "config.json")
    arch, family = family_of(hf, where)
    mcfg = model_config_from_hf(hf, family, where, max_seq_len)
    files = weight_files(src)
    tk, new_tokens, tok_notes = import_tokenizer(src)

    tensors, dtype = read_weights(files, expected_shapes(mcfg), mcfg.tie_embeddings)
    src_vocab = mcfg.vocab_size
    # Rows for the tokens we added (new rows, or spare rows past the source tokenizer's): the mean
    # of the existing rows, a neutral start that SFT then moves.
    vocab = max(src_vocab, max(tk.get_vocab(with_added_tokens=True).values()) + 1)
    new_ids = [tk.token_to_id(t) for t in new_tokens]
    heads = ["model.embed_tokens.weight"] + ([] if mcfg.tie_embeddings else ["lm_head.weight"])
    for k in heads:
        w = tensors[k]
        mean = w.mean(0, keepdim=True)
        if vocab > src_vocab:
            w = torch.cat([w, mean.expand(vocab - src_vocab, -1)])
        w[new_ids] = mean
        tensors[k] = w.contiguous()
    mcfg.vocab_size = vocab

    tok_cfg = _read_json(src / "tokenizer_config.json", required=False)
    template = tok_cfg.get("chat_template")
    if (src / "chat_template.jinja").is_file():
        template = (src / "chat_template.jinja").read_text(encoding="utf-8")
    source = {
        "path": str(src.resolve()), "architecture": arch, "family": family, "dtype": str(dtype).removeprefix("torch."),
        "vocab_size": src_vocab, "added_tokens": new_tokens, "max_position_embeddings": hf.get("max_position_embeddings"),
        "chat_template": template, "generation_config": _read_json(src / "generation_config.json", required=False),
        "special_tokens": {k: tok_cfg.get(k) for k in ("bos_token", "eos_token", "pad_token") if k in tok_cfg},
        "tokenizer_changes": tok_notes,
    }
    model = _module_with(mcfg, tensors)
    with tempfile.TemporaryDirectory() as tmp:
        tok_path = Path(tmp) / "tokenizer.json"
        tk.save(str(tok_path))
        step = checkpoint.save(out, 0, model, config={"model": to_dict(mcfg), "stage": "import", "source": source},
                               meta={"tokens": 0}, tokenizer_path=str(tok_path))
    return {"checkpoint": str(step), "config": mcfg, **source, "n_files": len(files)}


def _module_with(mcfg: ModelConfig, tensors: dict[str, torch.Tensor]) -> torch.nn.Module:
    """Our Transformer holding exactly `tensors` (no copy, no random init: built on meta)."""
    with torch.device("meta"):
        model = Transformer(mcfg)
    sd = dict(tensors)
    if mcfg.tie_embeddings:
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    model.load_state_dict(sd, strict=True, assign=True)
    if mcfg.tie_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model


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
            + "".join(f"  tokenizer: {n}\n" for n in s["tokenizer_changes"]) +
            f"  chat template: ours (<|bos|><|user|>...<|end|><|assistant|>); the source's is kept in config.json\n"
            f"  -> {s['checkpoint']}")


# ----------------------------------------------------------------------------- export

def hf_config_json(mcfg: ModelConfig, tok, dtype: torch.dtype, head: str = "lm_head", labels=None) -> dict:
    """config.json of the export: the HF family that computes our model exactly (Llama, or Qwen2
    with q/k/v biases), with our token ids."""
    arch = mcfg.hf_architecture()
    family = "qwen2" if arch.startswith("Qwen2") else "llama"
    kw = mcfg.hf_config()
    if head == "score":
        arch = arch.replace("ForCausalLM", "ForSequenceClassification")
        names = labels or ["score"]
        kw.update(id2label={str(i): n for i, n in enumerate(names)}, label2id={n: i for i, n in enumerate(names)})
    return {"architectures": [arch], "model_type": family, **kw, "head_dim": mcfg.dim // mcfg.n_heads,
            "initializer_range": mcfg.init_std, "bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id,
            "pad_token_id": tok.pad_id, "torch_dtype": str(dtype).removeprefix("torch."), "use_cache": True}


def _export_tokenizer(tok, out: Path, mcfg: ModelConfig, causal: bool) -> None:
    """tokenizer.json (ours, with <|bos|> put in front of plain text as Llama's tokenizers do) and
    tokenizer_config.json with our chat template."""
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


def export_hf(ckpt: str | Path, out: str | Path, *, dtype: str = "auto", adapter: bool = False, base: str = "") -> dict:
    """Write checkpoint `ckpt` as a Hugging Face model folder `out` (written under a temporary
    name and renamed, like our checkpoints). With `adapter`, `ckpt` must be a PPO run with LoRA:
    `out` gets the adapter (adapter_config.json, adapter_model.safetensors) and, unless `base`
    names one already exported, `out/base/`: the run's starting policy exported, the base model
    peft puts the adapter on."""
    d = checkpoint.resolve(ckpt)
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise CheckpointError(f"{out}: exists and is not empty; choose another output directory")
    if dtype not in ("auto", *DTYPES):
        raise CheckpointError(f"dtype {dtype!r}: expected auto, {', '.join(DTYPES)}")
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        if adapter:
            # peft resolves a relative base path from the working directory: give it in full
            summary = _export_adapter(d, tmp, dtype, base or str((out / "base").resolve()), export_base=not base)
        else:
            summary = _export_model(d, tmp, dtype)
        if out.exists():
            out.rmdir()
        publish(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {**summary, "out": str(out)}


def _export_model(d: Path, out: Path, dtype: str) -> dict:
    conf = checkpoint.read_config(d)
    mcfg = checkpoint.model_config(d).resolved()
    stage = conf.get("stage", "")
    tok = Tokenizer.load(checkpoint.tokenizer_of(d))
    source = conf.get("source") or {}
    if dtype == "auto":  # an untouched import goes back in its own dtype; anything trained in fp32
        dtype = source.get("dtype", "float32") if stage == "import" else "float32"
    tdtype = DTYPES[dtype]
    head, labels = "lm_head", None
    if stage in SCORE_STAGES:
        head = "score"
        labels = conf.get("labels") if stage == "classify" else None
        n_out = len(labels) if labels else 1
    else:
        n_out = 1
    shapes = expected_shapes(mcfg, head, n_out)
    weights = load_file(str(d / "model.safetensors"))
    for k in shapes:
        if k not in weights:
            raise CheckpointError(f"{d / 'model.safetensors'}: tensor '{k}' is missing")
        if tuple(weights[k].shape) != shapes[k]:
            raise CheckpointError(f"{d / 'model.safetensors'}: '{k}' has shape {tuple(weights[k].shape)}, "
                                  f"the config implies {shapes[k]}")
    extra = sorted(set(weights) - set(shapes))
    if extra:
        raise CheckpointError(f"{d / 'model.safetensors'}: unexpected tensor '{extra[0]}'")
    tensors = {k: weights[k].to(tdtype).contiguous() for k in shapes}
    config = hf_config_json(mcfg, tok, tdtype, head, labels)
    config["llmtrain"] = {"stage": stage, "checkpoint": str(d.resolve())}
    if stage == "reward":  # HF returns the raw score; llmtrain's reward is score - offset
        config["llmtrain"]["reward_offset"] = (conf.get("reward") or {}).get("offset", 0.0)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2))
    if head == "lm_head":
        gen = {"bos_token_id": tok.bos_id, "eos_token_id": [tok.eos_id, tok.end_id], "pad_token_id": tok.pad_id}
        (out / "generation_config.json").write_text(json.dumps(gen, indent=2))
    _export_tokenizer(tok, out, mcfg, causal=head == "lm_head")
    return {"checkpoint": str(d), "stage": stage, "architecture": config["architectures"][0], "dtype": dtype,
            "tensors": len(tensors), "labels": labels}


def _export_adapter(d: Path, out: Path, dtype: str, base: str, export_base: bool) -> dict:
    """A PPO run's LoRA adapters (train_state.pt, extra "lora") in peft's format. The base is the
    run's starting policy (exported to out/base with `export_base`); it is checked first to give
    back the saved (merged) policy with the adapters on."""
    conf = checkpoint.read_config(d)
    if conf.get("stage") not in ("ppo", "grpo", "rloo"):
        raise CheckpointError(f"{d}: --adapter needs an RL (ppo, grpo, rloo) checkpoint trained with lora.enabled=true "
                              f"(this one is stage {conf.get('stage')!r})")
    run_cfg = conf.get("config") or {}
    lora = run_cfg.get("lora") or {}
    if not lora.get("enabled"):
        raise CheckpointError(f"{d}: this PPO run had lora.enabled=false: there is no adapter; export it merged "
                              "(without --adapter)")
    state = checkpoint.load_train_state(d).get("extra", {}).get("lora") or {}
    prefix = "policy."
    ab = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if not ab:
        raise CheckpointError(f"{d / 'train_state.pt'}: no LoRA state of the policy")
    try:
        policy_ckpt = checkpoint.resolve(run_cfg.get("policy", ""))
    except CheckpointError as e:
        raise CheckpointError(f"{d}: the run's starting policy (its config's 'policy', the adapter's base) is "
                              f"needed: {e}") from None
    base_w = load_file(str(policy_ckpt / "model.safetensors"))
    merged = load_file(str(d / "model.safetensors"))
    scale = float(lora["alpha"]) / int(lora["r"])
    # The adapters on the base must give the saved policy, else the base has changed since.
    # Untouched weights are equal bit for bit; merged ones up to the rounding of a matmul that
    # may have run on another device (a changed base differs by far more).
    for k, w in merged.items():
        mod = k.removesuffix(".weight")
        if f"{mod}.lora_A" in ab:
            want = base_w[k] + (ab[f"{mod}.lora_B"] @ ab[f"{mod}.lora_A"]) * scale
            ok = bool((want - w).abs().max() <= 1e-5 * w.abs().max() + 1e-7)
        else:
            ok = k in base_w and torch.equal(base_w[k], w)
        if not ok:
            raise CheckpointError(f"{policy_ckpt}: '{k}' plus the adapter is not the PPO checkpoint's; was the "
                                  "starting policy overwritten? Export the merged model instead")
    tensors = {}
    for k, v in ab.items():  # model.layers.0.self_attn.q_proj.lora_A -> base_model.model.<same>.lora_A.weight
        tensors[f"base_model.model.{k}.weight"] = v.to(DTYPES["float32" if dtype == "auto" else dtype]).contiguous()
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    adapter_cfg = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base,
        "r": int(lora["r"]), "lora_alpha": float(lora["alpha"]), "lora_dropout": float(lora.get("dropout", 0.0)),
        "target_modules": list(lora["targets"]), "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
        "use_rslora": False, "use_dora": False, "init_lora_weights": True, "modules_to_save": None,
    }
    (out / "adapter_config.json").write_text(json.dumps(adapter_cfg, indent=2))
    tok = Tokenizer.load(checkpoint.tokenizer_of(d))
    _export_tokenizer(tok, out, checkpoint.model_config(d), causal=True)
    summary = {"checkpoint": str(d), "stage": "ppo", "architecture": "peft LoRA adapter", "dtype": dtype,
               "tensors": len(tensors), "targets": lora["targets"], "r": int(lora["r"]), "base": base}
    if export_base:
        (out / "base").mkdir()
        _export_model(policy_ckpt, out / "base", dtype)
    return summary


def export_line(s: dict) -> str:
    if s["architecture"] == "peft LoRA adapter":
        return (f"export: LoRA adapter (r={s['r']} on {', '.join(s['targets'])}) of {s['checkpoint']} -> {s['out']}; "
                f"base model: {s['base']}\n"
                f"  load: PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE), '{s['out']}')")
    what = "AutoModelForSequenceClassification" if "Sequence" in s["architecture"] else "AutoModelForCausalLM"
    return (f"export: {s['stage'] or 'checkpoint'} {s['checkpoint']} -> {s['out']} as {s['architecture']} "
            f"({s['tensors']} tensors, {s['dtype']}); load with {what} / AutoTokenizer (chat template included)")
