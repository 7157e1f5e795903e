"""The weights of an HF model folder: which safetensors files, every tensor checked by name and
shape against the model its config.json implies (a tied lm_head left out), read as fp32 into
our Transformer without a copy.
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from llmtrain.config import ModelConfig
from llmtrain.errors import CheckpointError
from llmtrain.interop.hf_config import read_json
from llmtrain.model import Transformer
from llmtrain.model.heads import ScoreModel


def weight_files(src: Path) -> list[Path]:
    """The safetensors files of an HF folder: the shards its index names, or model.safetensors."""
    index = src / "model.safetensors.index.json"
    if index.is_file():
        wm = read_json(index).get("weight_map")
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


def module_with(mcfg: ModelConfig, tensors: dict[str, torch.Tensor], head: str = "lm_head") -> torch.nn.Module:
    """Our Transformer (or, head="score", reward model) holding exactly `tensors` (no copy, no
    random init: built on meta)."""
    with torch.device("meta"):
        model = ScoreModel(mcfg, 1) if head == "score" else Transformer(mcfg)
    sd = dict(tensors)
    if head == "score":
        model.load_state_dict(sd, strict=True, assign=True)
        return model
    if mcfg.tie_embeddings:
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    model.load_state_dict(sd, strict=True, assign=True)
    if mcfg.tie_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model
