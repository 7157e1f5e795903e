"""Saving a checkpoint: atomically, pruning old ones, sharded runs through DCP.

Everything is written into `step_NNNNNNN.tmp`, fsynced (files, then the folder), and renamed
into place (then the parent folder is fsynced), so a kill or power cut at any moment leaves the
previous checkpoint whole. Saving a step that is already there (a resumed run saving its
start step again) renames the finished `step_N.tmp` to `step_N.ready` first, then the old
`step_N` aside, then `.ready` into place: a kill between those renames leaves a complete
`step_N.ready`, which step_dirs() (so resolve and resume) puts back as `step_N`, never no
copy at all. Old steps are pruned by renaming them to `.trash-step_NNNNNNN` before
deleting them; leftovers of either kind are removed at the next save and never resolved. A full
disk is a one-line DiskFullError naming the file, and the partial folder is removed.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from llmtrain.checkpoint.folders import READY, STEP_RE, TRASH, restore_ready, step_dirs
from llmtrain.dist import is_sharded
from llmtrain.files import disk_full, fsync_dir, fsync_file, fsync_tree, is_disk_full, remove
from llmtrain.model.adapters import merged_state_dict
from llmtrain.tokenizer import copy_tokenizer_files


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
                copy_tokenizer_files(tokenizer_path, tmp)  # and a model's own chat template, when it has one
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
        _put_in_place(root, tmp, final)
        if keep_last > 0:
            prune(root, keep_last)
    barrier()
    return final


def _put_in_place(root: Path, tmp: Path, final: Path) -> None:
    """Rename the finished, fsynced `tmp` to `final` and make the rename durable."""
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
    restore_ready(root)
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
