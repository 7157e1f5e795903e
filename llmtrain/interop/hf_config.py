"""An HF model folder's config files, and config.json <-> our ModelConfig.

family_of tells the family (Llama, Mistral, Qwen2) of a config.json and refuses any other;
model_config_from_hf maps it to our ModelConfig, refusing every setting we cannot compute
exactly (Llama 3.1's "llama3" rope scaling is the one scaling computed); hf_config_json is the
way back, the config.json of an export.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from llmtrain.config import ModelConfig
from llmtrain.errors import CheckpointError

# architecture in config.json -> our family name (model_type)
ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2",
                 # reward models: the backbone with a one-output score head at the last token
                 "LlamaForSequenceClassification": "llama", "MistralForSequenceClassification": "mistral",
                 "Qwen2ForSequenceClassification": "qwen2"}


def read_json(path: Path, required: bool = True) -> dict:
    """A JSON file of the folder (config.json, the index, tokenizer_config.json, ...); one that
    is optional and absent reads as {}."""
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


def hf_config_json(mcfg: ModelConfig, tok, dtype: torch.dtype, head: str = "lm_head", labels=None) -> dict:
    """config.json of the export: the HF family that computes our model exactly (Llama, or Qwen2
    with q/k/v biases), with our token ids."""
    arch = mcfg.hf_architecture()
    ids = {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id}
    if tok.template is not None:  # a model with its own chat template keeps its own tokens
        v = tok.template.variables
        ids = {f"{k}_token_id": tok.tk.token_to_id(v[f"{k}_token"]) for k in ("bos", "eos", "pad") if v.get(f"{k}_token")}
    family = "qwen2" if arch.startswith("Qwen2") else "llama"
    kw = mcfg.hf_config()
    if head == "score":
        arch = arch.replace("ForCausalLM", "ForSequenceClassification")
        names = labels or ["score"]
        kw.update(id2label={str(i): n for i, n in enumerate(names)}, label2id={n: i for i, n in enumerate(names)})
    return {"architectures": [arch], "model_type": family, **kw, "head_dim": mcfg.dim // mcfg.n_heads,
            "initializer_range": mcfg.init_std, **ids, "torch_dtype": str(dtype).removeprefix("torch."), "use_cache": True}
