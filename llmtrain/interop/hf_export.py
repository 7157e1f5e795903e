"""export_hf: our checkpoint -> an HF model folder, or a PPO run's LoRA as a peft adapter.

A language model exports as the HF family that computes it exactly (Llama, or Qwen2 for q/k/v
biases), a reward or classifier checkpoint as a sequence-classification model; an untouched
import goes back in its source dtype, bit for bit. The folder is written under a temporary
name and renamed into place, like our checkpoints.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from llmtrain import checkpoint
from llmtrain.errors import CheckpointError
from llmtrain.files import publish
from llmtrain.interop.hf_config import hf_config_json
from llmtrain.interop.hf_tokenizer import export_tokenizer, token_ids
from llmtrain.interop.hf_weights import expected_shapes
from llmtrain.tokenizer import Tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SCORE_STAGES = ("reward", "classify")  # checkpoints with a `score` head instead of `lm_head`


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
        gen = token_ids(tok)
        (out / "generation_config.json").write_text(json.dumps(gen, indent=2))
    export_tokenizer(tok, out, mcfg, causal=head == "lm_head")
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
    export_tokenizer(tok, out, checkpoint.model_config(d), causal=True)
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
