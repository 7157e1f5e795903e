"""Models from the Hugging Face Hub, or from a Hugging Face folder, wherever a stage takes a
checkpoint (`init_from`, `policy`, `reward_model`) and in `llmtrain import`.

A model source is one of
    runs/sft                      our run folder or step folder: used as it is;
    ~/models/SmolLM2-135M         a Hugging Face model folder (config.json + safetensors);
    HuggingFaceTB/SmolLM2-135M    a Hub id, optionally @revision (a branch, tag or commit).
A Hub id is fetched through `huggingface_hub` into its own cache (HF_HOME / HF_HUB_CACHE; a
gated model reads HF_TOKEN; HF_HUB_OFFLINE=1 reads only the cache). A Hugging Face model is
imported into our checkpoint layout once, under `<run>/imported/<name>`, and a stage that is
resumed or run again finds it there (the import records which folder, or which commit of the
Hub repository, it came from).
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

from llmtrain import checkpoint
from llmtrain.errors import CheckpointError
from llmtrain.interop.hf import import_hf

# org/name[@revision]: Hub repository ids are letters, digits, '-', '_' and '.', 96 at most.
HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95})(?:@(?P<rev>[\w./-]{1,200}))?$")
# What a model needs: config, weights, tokenizer, chat template; never pickles or other formats.
MODEL_FILES = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model", "*.txt"]


def is_ours(path: Path) -> bool:
    """A run folder or step folder written by llmtrain (its config.json names a stage)."""
    try:
        step = checkpoint.resolve(path)
    except CheckpointError:
        return False
    try:
        return "stage" in json.loads((step / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False


def is_hf_folder(path: Path) -> bool:
    """A folder as `save_pretrained` writes it: config.json naming a model type or architecture."""
    try:
        conf = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(conf, dict) and ("architectures" in conf or "model_type" in conf) and "stage" not in conf


def parse_hub_id(spec: str) -> tuple[str, str | None] | None:
    """"org/name[@rev]" -> (repo id, revision or None); None when it is not shaped like one."""
    m = HUB_ID.match(spec)
    if not m or ".." in spec:
        return None
    return m.group("repo"), m.group("rev")


def download(spec: str, key: str = "") -> Path:
    """The local snapshot folder of a Hub model id (fetched into the Hugging Face cache, or found
    there when offline). Errors are one line naming the id and what to do."""
    parsed = parse_hub_id(spec)
    if parsed is None:
        raise CheckpointError(f"{_named(key)}{spec!r}: not found (no such checkpoint folder, and not a Hub id "
                              "org/name[@revision])")
    repo, rev = parsed
    try:
        from huggingface_hub import snapshot_download  # lazy: 0.3 s, and only for Hub ids
        from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                            RepositoryNotFoundError, RevisionNotFoundError)
    except ImportError:
        raise CheckpointError(f"{_named(key)}{spec}: reading a Hub model needs huggingface_hub "
                              "(pip install 'llmtrain[hub]')") from None
    try:
        return Path(snapshot_download(repo, revision=rev, allow_patterns=MODEL_FILES))
    except GatedRepoError:
        raise CheckpointError(f"{_named(key)}{spec}: a gated model: accept its licence on the Hub and set HF_TOKEN") from None
    except RepositoryNotFoundError:
        raise CheckpointError(f"{_named(key)}{spec}: no such folder here, and no such model on the Hub "
                              "(or it is private: set HF_TOKEN)") from None
    except RevisionNotFoundError:
        raise CheckpointError(f"{_named(key)}{spec}: the Hub model has no revision {rev!r}") from None
    except LocalEntryNotFoundError:
        raise CheckpointError(f"{_named(key)}{spec}: no such folder here, and not in the Hugging Face cache while the Hub "
                              "cannot be reached (HF_HUB_OFFLINE=1, or no network)") from None
    except (HfHubHTTPError, OSError) as e:
        raise CheckpointError(f"{_named(key)}{spec}: could not fetch it from the Hub ({_first_line(e)})") from None


def resolve_model(spec: str, run_dir: str | Path, key: str = "", log=print) -> Path:
    """A model source (see the module doc) -> one of our checkpoints. A Hugging Face folder or
    Hub id is imported under `run_dir/imported/` the first time, and found there afterwards;
    `log` says which happened. Our own checkpoints come back as they are."""
    path = Path(spec).expanduser()
    try:
        exists = path.exists()
    except OSError as e:  # a name too long for the file system, ...
        raise CheckpointError(f"{_named(key)}{spec[:100]}{'...' if len(spec) > 100 else ''}: {e.strerror}") from None
    if exists:
        if is_ours(path):
            return path
        if not is_hf_folder(path):
            raise CheckpointError(f"{_named(key)}{path}: not a checkpoint: neither an llmtrain run or step folder nor a "
                                  "Hugging Face model folder (config.json and *.safetensors)")
        source, name = path.resolve(), _slug(path.resolve().name)
    else:
        source = download(spec, key)
        repo, rev = parse_hub_id(spec)
        name = _slug(repo.replace("/", "--") + (f"@{rev}" if rev else ""))
    out = Path(run_dir) / "imported" / name
    if not checkpoint.step_dirs(out) and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # every process of a torchrun would import into the same folder at once
        raise CheckpointError(f"{_named(key)}{spec}: under torchrun, import it first: llmtrain import {spec} -o DIR, "
                              f"then give {key or 'the checkpoint'}=DIR")
    if checkpoint.step_dirs(out):
        done = checkpoint.read_config(checkpoint.resolve(out)).get("source", {}).get("path")
        if done == str(source.resolve()):
            log(f"{key or 'model'}: {spec} was imported before into {out}")
            return out
        raise CheckpointError(f"{out}: holds an import of {done}, not of {spec}; remove it or choose another run folder")
    log(f"{key or 'model'}: importing the Hugging Face model {spec} ({source}) into {out}")
    import_hf(source, out)
    return out


def _slug(name: str) -> str:
    return re.sub(r"[^\w.@-]", "_", name)[:200]


def _named(key: str) -> str:
    return f"{key}: " if key else ""


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
