"""Shared fixtures: a tiny tokenizer and token shards built from a slice of the shipped corpus.

Everything is made under pytest's tmp dirs; nothing is downloaded.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO / "data" / "corpus" / "chitchat.txt"

os.environ.setdefault("OMP_NUM_THREADS", "2")


def corpus_slice(n_chars: int = 150_000) -> str:
    """The first whole documents of the shipped corpus, about n_chars long."""
    text = CORPUS.read_text(encoding="utf-8")[:n_chars]
    return text[: text.rfind("\n\n")] + "\n"


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    p.write_text(corpus_slice(), encoding="utf-8")
    return p


@pytest.fixture(scope="session")
def tokenizer_path(corpus_file, tmp_path_factory) -> Path:
    from llmtrain.data.corpus import iter_documents
    from llmtrain.tokenizer import train_tokenizer

    out = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    train_tokenizer(iter_documents([str(corpus_file)]), vocab_size=512, out=out)
    return out


@pytest.fixture(scope="session")
def shards(corpus_file, tokenizer_path, tmp_path_factory) -> Path:
    from llmtrain.data.pretrain import prepare

    out = tmp_path_factory.mktemp("shards") / "data"
    prepare([str(corpus_file)], str(tokenizer_path), str(out), val_every=10)
    return out


def tiny_pretrain_config(shards: Path, out_dir: Path, **run):
    """A 2-layer, 32-wide model: a few steps take well under a second on CPU."""
    from llmtrain.config import ModelConfig, OptimConfig, PretrainConfig, PretrainDataConfig, RunConfig

    r = dict(out_dir=str(out_dir), max_steps=6, batch_size=4, log_every=1, eval_every=0, eval_batches=2,
             seed=7, threads=1)
    r.update(run)
    return PretrainConfig(
        model=ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32),
        optim=OptimConfig(lr=3e-3, warmup_steps=2),
        data=PretrainDataConfig(shards=str(shards)),
        run=RunConfig(**r),
    )


@pytest.fixture(scope="session")
def pretrained(shards, tmp_path_factory) -> Path:
    """A tiny pretrained checkpoint (a run directory) for the later stages to start from."""
    from llmtrain.stages import pretrain

    out = tmp_path_factory.mktemp("pretrained") / "run"
    cfg = tiny_pretrain_config(shards, out, max_steps=30, batch_size=8)
    cfg.model.max_seq_len = 64
    cfg.optim.lr = 1e-2
    pretrain.main(cfg)
    return out


WORDS = ["apple", "river", "candle", "garden", "window", "pencil", "cloud", "violin", "bridge", "lantern",
         "meadow", "teapot", "harbour", "mirror", "saddle", "orchard", "ribbon", "castle", "feather", "compass"]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    import json

    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
