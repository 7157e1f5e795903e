"""Every arena model's answer to every held-out prompt, into the feedback database (the blind arena).

    llmtrain feedback arena-generate --db feedback.db --model sft=runs/sft --model ppo=runs/ppo \\
        --prompts data/sft/aristocrat.jsonl --val-every 10 --max-new-tokens 40

Greedy by default (--temperature 0): each model answers as `llmtrain evaluate` has it answer
(the same prompts rendered with the model's chat template, the same batches of 32 through
`generate`), so on the same prompts the arena's answers are evaluate's answers. With
--temperature > 0 each model samples one answer per prompt (--top-k, --top-p; the generator is
seeded with --seed afresh for each model). The settings are recorded with the answers.

Held-out prompts: the whole --prompts file, or with --val-every N every N-th prompt of it (as
evaluate's `val_every` and the demo's SFT split pick them). Only prompts that leave
--max-new-tokens of every model's context are used (the others are counted and named).
Models load one at a time; nothing is written until every model has answered, and then the
models, prompts, answers and matches go in as one transaction.
"""
from __future__ import annotations

from pathlib import Path

import torch

from llmtrain import checkpoint
from llmtrain.conversation import load_chat_model
from llmtrain.data.jsonl import split
from llmtrain.data.prompts import prompt_room, read_prompts
from llmtrain.errors import CheckpointError, ConfigError, DataError
from llmtrain.feedback.arena_store import check_model_name
from llmtrain.feedback.modelserver import name_checkpoint_pairs
from llmtrain.feedback.store import FeedbackStore
from llmtrain.generate import SamplingConfig, answer_text, generate
from llmtrain.model import Transformer
from llmtrain.tokenizer import Tokenizer, render_chat


def answer_all(model: Transformer, tok: Tokenizer, convs: list[list[dict]], sampling: SamplingConfig,
               generator: torch.Generator | None = None, batch_size: int = 32) -> list[dict]:
    """One answer per conversation {"text", "finished", "n_tokens"}, `batch_size` prompts at a time
    (greedy at temperature 0: then exactly `generate.greedy_answers`, which evaluate uses)."""
    s = SamplingConfig(sampling.max_new_tokens, sampling.temperature, sampling.top_k, sampling.top_p, tok.stop_ids)
    out = []
    for i in range(0, len(convs), batch_size):
        prompts = [render_chat(tok, c, add_generation_prompt=True)[0] for c in convs[i:i + batch_size]]
        for ids in generate(model, prompts, s, pad_id=tok.pad_id, generator=generator):
            text, finished = answer_text(tok, ids, s.stop_ids)
            out.append({"text": text, "finished": finished, "n_tokens": len(ids)})
    return out


def parse_models(specs: list[str], flag: str = "--model") -> list[tuple[str, str]]:
    """NAME=CKPT specs -> [(name, checkpoint path)]: two or more, names valid and distinct."""
    out = name_checkpoint_pairs(specs, flag, check_model_name)
    if len(out) < 2:
        raise ConfigError(f"{flag}: the arena needs at least two models (give {flag} NAME=CHECKPOINT twice or more)")
    return out


def held_out(prompts_path: str, val_every: int, max_prompts: int) -> list[list[dict]]:
    convs = read_prompts(prompts_path)
    if val_every:
        convs = split(convs, val_every)[1]
    convs = convs[: max_prompts or None]
    if not convs:
        raise DataError(f"{prompts_path}: no held-out prompt (with --val-every {val_every}, every {val_every}-th "
                        f"prompt is held out)")
    return convs


def fitting(models: list[tuple[str, str]], convs: list[list[dict]], max_new: int) -> tuple[list[list[dict]], int]:
    """The conversations that leave max_new tokens of every model's context -> (them, how many did not)."""
    keep = [True] * len(convs)
    for name, path in models:
        d = checkpoint.resolve(path)
        ctx = checkpoint.model_config(d).max_seq_len
        room = prompt_room(ctx, max_new, "--max-new-tokens", f" of {d}")
        tok = Tokenizer.load(checkpoint.tokenizer_of(d))
        for i, c in enumerate(convs):
            keep[i] = keep[i] and len(render_chat(tok, c, add_generation_prompt=True)[0]) <= room
    kept = [c for c, k in zip(convs, keep) if k]
    return kept, len(convs) - len(kept)


def generate_arena(models: list[tuple[str, str]], prompts_path: str, db: str, sampling: SamplingConfig,
                   seed: int = 0, device: str = "auto", val_every: int = 0, max_prompts: int = 0) -> dict:
    """Every model's answer to every held-out prompt into `db` (module doc) -> counts. Everything
    that can be refused is refused before a model loads, and before a new database is made."""
    dirs = {}
    for name, path in models:
        try:
            dirs[name] = str(checkpoint.resolve(path).resolve())
        except CheckpointError as e:
            raise CheckpointError(f"--model {name}={path}: {e}") from None
    known = {}
    if Path(db).is_file():
        with FeedbackStore(db) as store:
            known = {m["name"]: m["checkpoint"] for m in store.arena_models()}
    for name, d in dirs.items():
        if name in known and known[name] != d:
            raise ConfigError(f"--model {name}={d}: the arena in {db} has a model named {name} already, from "
                              f"{known[name]}; give this one another name")
    convs = held_out(prompts_path, val_every, max_prompts)
    n_all = len(convs)
    convs, long = fitting(models, convs, sampling.max_new_tokens)
    if not convs:
        raise DataError(f"{prompts_path}: none of its {n_all} held-out prompts leaves --max-new-tokens "
                        f"{sampling.max_new_tokens} of every model's context window")
    if long:
        print(f"feedback arena-generate: {long} of {n_all} held-out prompts too long for some model's context "
              f"with --max-new-tokens {sampling.max_new_tokens}: skipped")
    answers, steps = {}, {}
    for name, path in models:
        tok, model = load_chat_model(path, device)
        gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
        answers[name] = answer_all(model, tok, convs, sampling, gen)
        steps[name] = checkpoint.read_meta(checkpoint.resolve(path)).get("step")
        del model
    greedy = sampling.temperature == 0
    settings = {"arena": True, "decoding": "greedy" if greedy else "sampling", "prompts": str(prompts_path),
                "val_every": val_every, "max_prompts": max_prompts, "max_new_tokens": sampling.max_new_tokens,
                "models": {n: {"checkpoint": dirs[n], "step": steps[n]} for n, _ in models},
                **({} if greedy else {"temperature": sampling.temperature, "top_k": sampling.top_k,
                                      "top_p": sampling.top_p, "seed": seed})}
    store = FeedbackStore(db)
    with store.transaction():
        ids = {name: store.add_arena_model(name, dirs[name]) for name, _ in models}
        gid = store.add_generation(settings)
        matches = 0
        for i, conv in enumerate(convs):
            matches += len(store.add_arena_prompt(conv, {ids[n]: answers[n][i] for n, _ in models}, gid)[1])
    store.close()
    return {"models": len(models), "prompts": len(convs), "matches": matches, "skipped_long": long,
            "generation_id": gid, "decoding": settings["decoding"]}
