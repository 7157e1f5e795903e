"""The step folders of a run directory: `checkpoints/step_NNNNNNN/`, each complete or absent.

step_dirs() lists the complete ones, putting back a `step_N.ready` that a re-save killed
between its renames left (see saving.save); `.tmp` folders of unfinished saves and
`.trash-` folders of unfinished prunes are never listed. resolve() turns "the checkpoint"
handed from stage to stage (a step folder, or a run directory: its latest complete step)
into a step folder.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from llmtrain.errors import CheckpointError
from llmtrain.files import fsync_dir

STEP_RE = re.compile(r"^step_(\d+)$")
TRASH = ".trash-"  # prefix of a step folder renamed away before it is deleted
READY = ".ready"  # suffix of a complete, fsynced step folder about to replace one of the same step


def step_dirs(run_dir: str | Path) -> list[Path]:
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        if root.exists() or root.is_symlink():  # never "no checkpoints": that would restart from step 0
            raise CheckpointError(f"{root}: is not a folder (expected the run's checkpoints/ folder; "
                                  "move it away or choose another run.out_dir)")
        return []
    restore_ready(root)
    found = []
    for p in root.iterdir():
        m = STEP_RE.match(p.name) or (p.name.endswith(READY) and STEP_RE.match(p.name[:-len(READY)]))
        ready = p.name.endswith(READY)
        if ready and (root / p.name[:-len(READY)]).exists():
            continue  # a re-save killed before its renames: the step folder itself is whole
        if m and p.is_dir():  # a .ready still here could not be renamed back (read-only): read it as is
            found.append((int(m.group(1)), ready, p))
    return [p for _, _, p in sorted(found)]


def restore_ready(root: Path) -> None:
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
