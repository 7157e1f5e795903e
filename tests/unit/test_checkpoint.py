from pathlib import Path

import pytest
import torch

from llmtrain import checkpoint
from llmtrain.config import ModelConfig
from llmtrain.errors import CheckpointError
from llmtrain.model import Transformer

CFG = ModelConfig(vocab_size=40, dim=32, n_layers=1, n_heads=2, max_seq_len=16, tie_embeddings=True)


def save(tmp_path, model, step=1, **kw):
    return checkpoint.save(tmp_path, step, model, config={"model": vars(CFG)}, meta={"tokens": 0}, **kw)


def test_round_trip_and_latest(tmp_path):
    m = Transformer(CFG)
    opt = torch.optim.AdamW(m.parameters())
    m(torch.randint(0, 40, (1, 8))).sum().backward()
    opt.step()
    save(tmp_path, m, 1, optimizer=opt)
    save(tmp_path, m, 2, optimizer=opt)
    (tmp_path / "checkpoints" / "step_0000009.tmp").mkdir()  # a killed save: ignored
    assert checkpoint.resolve(tmp_path).name == "step_0000002"
    m2 = Transformer(checkpoint.model_config(tmp_path))
    checkpoint.load_weights(tmp_path, m2)
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), m2.state_dict().values()))
    state = checkpoint.load_train_state(tmp_path)
    opt2 = torch.optim.AdamW(m2.parameters())
    opt2.load_state_dict(state["optimizer"])
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])


def test_keep_last(tmp_path):
    m = Transformer(CFG)
    for s in range(1, 5):
        save(tmp_path, m, s, keep_last=2)
    assert [p.name for p in checkpoint.step_dirs(tmp_path)] == ["step_0000003", "step_0000004"]


class Payload:
    """Unpickling this calls open(marker, "w"): a file appears if the loader ever runs pickled code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("victim", ["train_state.pt", "rng_rank1.pt"])
def test_pickled_code_is_refused_and_never_runs(tmp_path, victim):
    """torch.save of an object whose unpickling runs code, in the training state or in a rank's
    RNG file: the load is refused with a CheckpointError naming the file, and the code never ran
    (with weights_only=False torch would create the marker before anything could refuse it)."""
    m = Transformer(CFG)
    d = save(tmp_path, m, optimizer=torch.optim.AdamW(m.parameters()))
    marker = tmp_path / "payload_ran"
    if victim == "train_state.pt":
        torch.save({"optimizer": Payload(marker), "rng": None}, d / victim)
    else:
        torch.save({"torch": Payload(marker)}, d / victim)
    try:
        checkpoint.load_train_state(d, rank=0 if victim == "train_state.pt" else 1)
        error = "(loaded without an error)"
    except CheckpointError as e:
        error = str(e)
    assert not marker.exists(), f"the pickled payload ran while loading {victim}"
    assert error.startswith(f"{d / 'train_state.pt'}: refused or unreadable"), error


def test_mismatched_weights_name_the_key(tmp_path):
    save(tmp_path, Transformer(CFG))
    other = Transformer(ModelConfig(vocab_size=40, dim=64, n_layers=1, n_heads=2, max_seq_len=16, tie_embeddings=True))
    with pytest.raises(CheckpointError, match="'model.embed_tokens.weight' has shape"):
        checkpoint.load_weights(tmp_path, other)
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        checkpoint.resolve(tmp_path / "nope")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "model.safetensors").write_bytes(b"not a tensor file")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        checkpoint.load_weights(tmp_path / "junk", Transformer(CFG))


@pytest.mark.parametrize("tied", [True, False])
def test_load_transformer_skips_the_init_it_would_overwrite(tmp_path, tied, monkeypatch):
    """checkpoint.load_transformer gives Transformer + load_weights's model, bit for bit (the
    tied head tied), without running init_weights; a checkpoint that lacks a weight is still
    refused, so no weight keeps torch's default initialisation."""
    cfg = ModelConfig(vocab_size=40, dim=32, n_layers=2, n_heads=2, max_seq_len=16, tie_embeddings=tied)
    m = Transformer(cfg)
    checkpoint.save(tmp_path, 1, m, config={"model": vars(cfg)}, meta={"tokens": 0})
    ref = Transformer(checkpoint.model_config(tmp_path))
    checkpoint.load_weights(tmp_path, ref)
    calls = []
    real = Transformer.init_weights
    monkeypatch.setattr(Transformer, "init_weights", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    got = checkpoint.load_transformer(tmp_path)
    assert calls == []
    assert got.state_dict().keys() == ref.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(got.state_dict().values(), ref.state_dict().values()))
    assert (got.lm_head.weight is got.model.embed_tokens.weight) == tied
    ids = torch.randint(0, 40, (2, 8))
    assert torch.equal(got(ids), ref(ids))
    # a weight missing from the file: refused in one line, never left at torch's default init
    from safetensors.torch import load_file, save_file
    f = checkpoint.resolve(tmp_path) / "model.safetensors"
    sd = load_file(f)
    sd.pop("model.layers.1.mlp.up_proj.weight")
    save_file(sd, f)
    with pytest.raises(CheckpointError, match="missing model.layers.1.mlp.up_proj.weight"):
        checkpoint.load_transformer(tmp_path)
