"""Checkpoints: safetensors weights + JSON metadata + training state, written atomically.

A run directory holds `checkpoints/step_NNNNNNN/` folders, each complete or absent:
    model.safetensors   the weights (HF Llama names; a tied lm_head is not stored twice)
    config.json         {"model": ModelConfig, "stage": ..., "config": the stage's whole config}
    meta.json           progress: step, tokens seen, last losses, data-loader state
    tokenizer.json      a copy, so a checkpoint is usable on its own
    train_state.pt      optimizer state, RNG state of rank 0 (rng_rank{r}.pt for other ranks), and
                        what else a stage needs to resume (e.g. PPO's value model and LoRA adapters)

Everything is written into `step_NNNNNNN.tmp`, fsynced (files, then the folder), and renamed
into place (then the parent folder is fsynced), so a kill or power cut at any moment leaves the
previous checkpoint whole. Saving a step that is already there (a resumed run saving its
start step again) renames the finished `step_N.tmp` to `step_N.ready` first, then the old
`step_N` aside, then `.ready` into place: a kill between those renames leaves a complete
`step_N.ready`, which step_dirs() (so resolve and resume) puts back as `step_N`, never no
copy at all. Old steps are pruned by renaming them to `.trash-step_NNNNNNN` before
deleting them; leftovers of either kind are removed at the next save and never resolved. A full
disk is a one-line DiskFullError naming the file, and the partial folder is removed. Training state is read with `weights_only=True`, so
loading a checkpoint never runs code from a pickle.

"The checkpoint" handed from stage to stage may be a step folder or a run directory; a run
directory means its latest complete step.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from llmtrain.config import ModelConfig, from_dict
from llmtrain.dist import is_sharded
from llmtrain.errors import CheckpointError
from llmtrain.files import disk_full, fsync_dir, fsync_file, fsync_tree, is_disk_full, remove
from llmtrain.model.adapters import merged_state_dict

STEP_RE = re.compile(r"^step_(\d+)$")
TRASH = ".trash-"  # prefix of a step folder renamed away before it is deleted
READY = ".ready"  # suffix of a complete, fsynced step folder about to replace one of the same step
# Sizes beyond these in a checkpoint's config.json are damage, not a model: refused before the
# model is built (10**12 positions would ask for terabytes for the rotary tables alone).
LIMITS = {"vocab_size": 1 << 22, "dim": 1 << 16, "n_layers": 1 << 10, "n_heads": 1 << 12, "n_kv_heads": 1 << 12,
          "ffn_dim": 1 << 18, "max_seq_len": 1 << 21, "rope_original_max_len": 1 << 21}


def step_dirs(run_dir: str | Path) -> list[Path]:
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        if root.exists() or root.is_symlink():  # never "no checkpoints": that would restart from step 0
            raise CheckpointError(f"{root}: is not a folder (expected the run's checkpoints/ folder; "
                                  "move it away or choose another run.out_dir)")
        return []
    _restore_ready(root)
    found = []
    for p in root.iterdir():
        m = STEP_RE.match(p.name) or (p.name.endswith(READY) and STEP_RE.match(p.name[:-len(READY)]))
        ready = p.name.endswith(READY)
        if ready and (root / p.name[:-len(READY)]).exists():
            continue  # a re-save killed before its renames: the step folder itself is whole
        if m and p.is_dir():  # a .ready still here could not be renamed back (read-only): read it as is
            found.append((int(m.group(1)), ready, p))
    return [p for _, _, p in sorted(found)]


def _restore_ready(root: Path) -> None:
    """Put back a complete step_N.ready whose step_N is missing (a kill between the renames of a
    re-save). Safe against a save or another reader doing the same at once: one rename wins."""
    for p in list(root.iterdir()):
        if not p.name.endswith(READY) or not STEP_RE.match(p.name[:-len(READY)]):
            continue
        final = root / p.name[:-len(READY)]
        if final.exists():
            continue
        try:
            os.replace(p, final)
            fsync_dir(root)
        except OSError:
            pass  # renamed by someone else meanwhile, or a read-only folder: step_dirs reads it as is


def resolve(path: str | Path) -> Path:
    """A step folder as is; a run directory -> its latest complete step folder."""
    p = Path(path)
    if (p / "model.safetensors").is_file():
        return p
    steps = step_dirs(p)
    if steps:
        return steps[-1]
    if not p.exists():
        raise CheckpointError(f"checkpoint not found: {p}")
    raise CheckpointError(f"{p}: not a checkpoint (no model.safetensors, no checkpoints/step_* inside)")


def model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    sd = merged_state_dict(model)  # LoRA updates merged: saved weights never need adapters
    cfg = getattr(model, "config", None)
    if cfg is not None and getattr(cfg, "tie_embeddings", False):
        sd.pop("lm_head.weight", None)  # the same tensor as model.embed_tokens.weight
    return {k: v.detach().contiguous().cpu() for k, v in sd.items()}


def save(run_dir: str | Path, step: int, model: torch.nn.Module, *, config: dict, meta: dict,
         tokenizer_path: str | None = None, optimizer: torch.optim.Optimizer | None = None,
         rng: dict | None = None, keep_last: int = 0, rank: int = 0, barrier=lambda: None,
         extra_state: dict | None = None, train_module: torch.nn.Module | None = None) -> Path:
    """Write checkpoint `step` atomically; on rank 0 all but rng of other ranks. Returns its folder.

    A model sharded by FSDP2 is saved twice, both collectives: its shards and the optimizer's
    with torch.distributed.checkpoint under dcp/ (each rank writes its own; loading reshards to
    any number of processes), and consolidated on rank 0 as model.safetensors for inference.
    `train_module` is the module the optimizer trains when it is more than `model` (PPO's
    policy + value): its shards go to dcp/, `model`'s weights to model.safetensors.
    """
    root = Path(run_dir) / "checkpoints"
    final = root / f"step_{step:07d}"
    tmp = root / f"step_{step:07d}.tmp"
    current = tmp
    try:
        if rank == 0:
            root.mkdir(parents=True, exist_ok=True)
            _clear_leftovers(root)
            tmp.mkdir()
        barrier()
        sharded = is_sharded(model)
        if sharded:
            current = tmp / "dcp"
            weights = _save_sharded(model, train_module or model, optimizer, current)
            optimizer = None  # its state is in dcp/
        if rank != 0 and rng is not None:
            current = tmp / f"rng_rank{rank}.pt"
            torch.save(rng, current)
            fsync_file(current)
        if rank == 0:
            current = tmp / "model.safetensors"
            save_file(weights if sharded else model_state(model), str(current), metadata={"format": "pt"})
            current = tmp / "config.json"
            current.write_text(json.dumps(config, indent=2))
            current = tmp / "meta.json"
            current.write_text(json.dumps({"step": step, **meta}, indent=2))
            if tokenizer_path:
                current = tmp / "tokenizer.json"
                shutil.copyfile(tokenizer_path, current)
            if optimizer is not None or sharded:
                current = tmp / "train_state.pt"
                torch.save({"optimizer": optimizer.state_dict() if optimizer is not None else None, "rng": rng,
                            "extra": extra_state or {}, "sharded": sharded}, current)
            current = tmp
            fsync_tree(tmp)  # every byte on disk before the rename makes the checkpoint visible
    except BaseException as e:
        full = is_disk_full(e, current)  # asked before the partial files go: they are what filled it
        if rank == 0:
            remove(tmp)
        if full:
            raise disk_full(current, f"the partial checkpoint {tmp.name} was removed") from None
        raise
    barrier()
    if rank == 0:
        if final.exists():
            # The same step saved again. The new folder is first renamed to .ready (complete,
            # fsynced), and only then the old one aside: at every moment one complete copy has a
            # name that step_dirs() takes, so a kill between the renames loses nothing.
            ready = root / f"{final.name}{READY}"
            old = root / f"{TRASH}{final.name}"
            remove(ready)
            remove(old)
            os.replace(tmp, ready)
            fsync_dir(root)
            os.replace(final, old)
            try:
                os.replace(ready, final)
            except FileNotFoundError:  # a reader's step_dirs() put it back meanwhile
                if not final.is_dir():
                    raise
        else:
            os.replace(tmp, final)
        fsync_dir(root)
        remove(root / f"{TRASH}{final.name}")
        if keep_last > 0:
            prune(root, keep_last)
    barrier()
    return final


def prune(root: Path, keep_last: int) -> None:
    """Keep the newest `keep_last` step folders. Each older one is first renamed away to
    .trash-step_N (one atomic rename), and only then deleted: a kill during the deletion leaves a
    trash folder, which the next save removes, never a step folder without its weights."""
    doomed = step_dirs(root.parent)[:-keep_last]
    trash = []
    for p in doomed:
        t = root / f"{TRASH}{p.name}"
        remove(t)
        os.replace(p, t)
        trash.append(t)
    if trash:
        fsync_dir(root)
    for t in trash:
        remove(t)


def _clear_leftovers(root: Path) -> None:
    """Remove what killed saves and prunes left behind: step_N.tmp folders (which may be what
    filled the disk) and .trash-step_N folders. resolve() never picks either. A complete
    step_N.ready whose step_N is missing is put back first, never deleted."""
    _restore_ready(root)
    for p in root.iterdir():
        if p.name.startswith(TRASH) or (p.name.startswith("step_") and not STEP_RE.match(p.name)):
            remove(p)


def _save_sharded(model: torch.nn.Module, trained: torch.nn.Module, optimizer, path: Path) -> dict[str, torch.Tensor]:
    """DCP save of the shards of `trained` and its optimizer; returns `model`'s full weights
    (on rank 0; other ranks get {})."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict

    msd, osd = get_state_dict(trained, optimizer) if optimizer is not None else (get_model_state_dict(trained), {})
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(path))
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    cfg = getattr(model, "config", None)
    if cfg is not None and getattr(cfg, "tie_embeddings", False):
        full.pop("lm_head.weight", None)
    return {k: v.contiguous() for k, v in full.items()}


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
