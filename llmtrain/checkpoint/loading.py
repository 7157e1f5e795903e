"""Reading a checkpoint back, every file checked before it is used: a damaged or foreign file
is a one-line CheckpointError naming it, never a crash or a silent restart from step 0.

The model config is checked against the weights' shapes (from the safetensors header) before
any model is built; training state is read with `weights_only=True`, so loading a checkpoint
never runs code from a pickle.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from llmtrain.checkpoint.folders import STEP_RE, resolve
from llmtrain.config import ModelConfig, from_dict
from llmtrain.dist import is_sharded
from llmtrain.errors import CheckpointError
from llmtrain.model import Transformer

# Sizes beyond these in a checkpoint's config.json are damage, not a model: refused before the
# model is built (10**12 positions would ask for terabytes for the rotary tables alone).
LIMITS = {"vocab_size": 1 << 22, "dim": 1 << 16, "n_layers": 1 << 10, "n_heads": 1 << 12, "n_kv_heads": 1 << 12,
          "ffn_dim": 1 << 18, "max_seq_len": 1 << 21, "rope_original_max_len": 1 << 21}


def load_model_and_optimizer(step_dir: str | Path, model: torch.nn.Module, optimizer, state: dict) -> None:
    """Weights and optimizer state of a checkpoint into a model that may be sharded.

    A checkpoint with dcp/ (written by FSDP2) loads into any number of processes, sharded or
    not: DCP reshards. One without (one process or DDP) loads into an unsharded model; into a
    sharded one it would need its optimizer state re-keyed, so that is refused clearly."""
    step_dir = resolve(step_dir)
    if (step_dir / "dcp").is_dir():
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        msd, osd = get_state_dict(model, optimizer)
        target = {"model": msd, "optim": osd}
        dcp.load(target, checkpoint_id=str(step_dir / "dcp"))
        set_state_dict(model, optimizer, model_state_dict=target["model"], optim_state_dict=target["optim"])
        return
    if is_sharded(model):
        raise CheckpointError(f"{step_dir}: saved without sharding (one process or ddp); resume it with "
                              "run.strategy=ddp, or start a sharded run from it with init_from")
    load_weights(step_dir, model)
    if state.get("optimizer") is not None:
        try:
            optimizer.load_state_dict(state["optimizer"])
        except (ValueError, KeyError, TypeError, IndexError, RuntimeError) as e:
            raise CheckpointError(f"{step_dir / 'train_state.pt'}: the optimizer state does not fit this model "
                                  f"({str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__})") from None


def read_config(ckpt: str | Path) -> dict:
    p = resolve(ckpt) / "config.json"
    try:
        conf = json.loads(p.read_bytes().decode("utf-8"))
    except (OSError, ValueError, RecursionError) as e:  # ValueError: bad JSON or not UTF-8
        raise CheckpointError(f"{p}: unreadable ({type(e).__name__})") from None
    if not isinstance(conf, dict) or not isinstance(conf.get("model"), dict):
        raise CheckpointError(f"{p}: damaged (no 'model' section)")
    return conf


def model_config(ckpt: str | Path) -> ModelConfig:
    """The checkpoint's model config, checked before any model is built: sizes within LIMITS,
    and vocab_size, dim, n_layers and ffn_dim equal to the shapes of the saved weights (read
    from the safetensors header only)."""
    d = resolve(ckpt)
    p = d / "config.json"
    section = read_config(d)["model"]
    for key, limit in LIMITS.items():
        v = section.get(key)
        if type(v) is int and v > limit:
            raise CheckpointError(f"{p}: damaged, 'model.{key}' is {_short(v)}, beyond any model this trains "
                                  f"(at most {limit:,})")
    cfg = from_dict(ModelConfig, section, source=str(p), prefix="model.")
    _check_against_weights(cfg, d, p)
    return cfg


def _check_against_weights(cfg: ModelConfig, d: Path, p: Path) -> None:
    try:
        with safe_open(str(d / "model.safetensors"), framework="pt", device="cpu") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception:
        return  # unreadable weights: load_weights names the file when the model loads them
    def differs(key: str, config_value: int, weights_value: int, where: str) -> None:
        if config_value != weights_value:
            raise CheckpointError(f"{p}: damaged, 'model.{key}' is {_short(config_value)} but {where} in "
                                  f"model.safetensors says {weights_value}")
    emb = shapes.get("model.embed_tokens.weight")
    if emb is not None and len(emb) == 2:
        if cfg.vocab_size:
            differs("vocab_size", cfg.vocab_size, emb[0], "model.embed_tokens.weight")
        differs("dim", cfg.dim, emb[1], "model.embed_tokens.weight")
    layers = {int(k.split(".")[2]) for k in shapes if k.startswith("model.layers.") and k.split(".")[2].isdigit()}
    if layers:
        differs("n_layers", cfg.n_layers, max(layers) + 1, "the number of model.layers.N")
    gate = shapes.get("model.layers.0.mlp.gate_proj.weight")
    if cfg.ffn_dim and gate is not None and len(gate) == 2:
        differs("ffn_dim", cfg.ffn_dim, gate[0], "model.layers.0.mlp.gate_proj.weight")


def _short(value) -> str:
    r = repr(value)
    return r if len(r) <= 40 else r[:37] + "..."


def read_meta(ckpt: str | Path) -> dict:
    """meta.json of a checkpoint, checked: a damaged one is an error, never "start from step 0"."""
    d = resolve(ckpt)
    p = d / "meta.json"
    try:
        meta = json.loads(p.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{p}: missing (an incomplete checkpoint)") from None
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise CheckpointError(f"{p}: damaged, not readable JSON ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{p}: damaged, expected a JSON object, got {type(meta).__name__}")
    for key, kind in (("step", int), ("tokens", int)):
        v = meta.get(key)
        if key not in meta:
            raise CheckpointError(f"{p}: damaged, no '{key}'")
        if type(v) is not kind or v < 0:
            raise CheckpointError(f"{p}: damaged, '{key}' must be a whole number >= 0, got {_short(v)}")
    m = STEP_RE.match(d.name)
    if m and int(m.group(1)) != meta["step"]:
        raise CheckpointError(f"{p}: damaged, 'step' is {meta['step']} in a folder named {d.name}")
    if "data" in meta and not isinstance(meta["data"], dict):
        raise CheckpointError(f"{p}: damaged, 'data' must be a JSON object, got {_short(meta['data'])}")
    return meta


def load_transformer(ckpt: str | Path) -> Transformer:
    """The checkpoint's language model, every weight loaded (strict), built without the random
    initialisation that the load would overwrite. For inference: draws from the global RNG
    differ from `Transformer(cfg)`'s, so training stages keep building theirs after seeding."""
    model = Transformer(model_config(ckpt), init=False)
    load_weights(ckpt, model)
    return model


def load_weights(ckpt: str | Path, model: torch.nn.Module, strict: bool = True,
                 new_head: tuple[str, ...] = ()) -> None:
    """Load model.safetensors into `model`, naming any missing, unexpected or misshapen key.

    `new_head` names prefixes of a head that is new in `model` (e.g. "score."): those keys may
    be missing, and the checkpoint's own word head (lm_head) is then not expected to fit.
    """
    path = resolve(ckpt) / "model.safetensors"
    own = model.state_dict()
    tied = getattr(getattr(model, "config", None), "tie_embeddings", False)
    try:
        # Tensor by tensor from the file into the model: never the whole file in memory twice.
        with safe_open(str(path), framework="pt", device="cpu") as f:
            keys = [k for k in f.keys() if not (new_head and k.startswith("lm_head."))]
            for k in keys:
                shape = tuple(f.get_slice(k).get_shape())
                if k in own and tuple(own[k].shape) != shape:
                    raise CheckpointError(f"{path}: '{k}' has shape {shape}, the model expects {tuple(own[k].shape)}")
            missing = [k for k in own if k not in keys and not (tied and k == "lm_head.weight")
                       and not k.startswith(new_head or ("\0",))]
            unexpected = [k for k in keys if k not in own]
            if strict and (missing or unexpected):
                parts = []
                if missing:
                    parts.append(f"missing {', '.join(missing[:5])}")
                if unexpected:
                    parts.append(f"unexpected {', '.join(unexpected[:5])}")
                raise CheckpointError(f"{path}: weights do not fit the model ({'; '.join(parts)})")
            with torch.no_grad():
                for k in keys:
                    if k in own:
                        own[k].copy_(f.get_tensor(k))
    except CheckpointError:
        raise
    except Exception as e:  # safetensors' error class moved between versions
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None


def load_train_state(ckpt: str | Path, rank: int = 0) -> dict:
    """Optimizer and RNG state, read without unpickling code (weights_only=True)."""
    d = resolve(ckpt)
    path = d / "train_state.pt"
    if not path.is_file():
        raise CheckpointError(f"{d}: no train_state.pt (a weights-only checkpoint cannot be resumed)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if rank != 0 and isinstance(state, dict):
            rp = d / f"rng_rank{rank}.pt"
            state["rng"] = torch.load(rp, map_location="cpu", weights_only=True) if rp.is_file() else None
    except Exception as e:  # an unpickling error is refused, not executed
        first = str(e).strip().splitlines()[0].split(". ")[0][:120] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: refused or unreadable ({first})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: damaged, expected a dict of training state, got {type(state).__name__}")
    for key in ("optimizer", "rng", "extra"):
        if state.get(key) is not None and not isinstance(state[key], dict):
            raise CheckpointError(f"{path}: damaged, '{key}' must be a dict, got {type(state[key]).__name__}")
    opt = state.get("optimizer")
    if opt is not None and not (isinstance(opt.get("state"), dict) and isinstance(opt.get("param_groups"), list)):
        raise CheckpointError(f"{path}: damaged, the optimizer state has no 'state' / 'param_groups'")
    return state


def tokenizer_of(ckpt: str | Path) -> Path:
    p = resolve(ckpt) / "tokenizer.json"
    if not p.is_file():
        raise CheckpointError(f"{resolve(ckpt)}: no tokenizer.json in the checkpoint")
    return p
