"""K sampled answers per prompt from a fine-tuned checkpoint, into the feedback database.

    llmtrain feedback generate CKPT --prompts prompts.jsonl -k 4 --db feedback.db

Prompts are JSONL lines {"prompt": ...} or {"messages": [...ending with a user turn]}. Each
prompt is rendered with the shared chat template and repeated K times in one batched,
KV-cached generation. The checkpoint and the sampling settings are recorded with them.

With `rounds` R > 1 every prompt is answered R times over, K fresh samples each time, and
each round is its own ranking task: an annotator ranks K answers at a time (K <= 9 fits the
ranking page), and the reward model gets R x C(K,2) pairs per prompt instead of C(K,2).
"""
from __future__ import annotations

import torch

from llmtrain import checkpoint, dist
from llmtrain.data.prompts import fit_prompts, prompt_room, read_prompts
from llmtrain.errors import DataError
from llmtrain.feedback.store import FeedbackStore
from llmtrain.generate import SamplingConfig, generate
from llmtrain.model import Transformer
from llmtrain.tokenizer import Tokenizer, render_chat


def sample_candidates(model: Transformer, tok: Tokenizer, convs: list[list[dict]], k: int, sampling: SamplingConfig,
                      generator: torch.Generator | None = None, batch_prompts: int = 32) -> list[list[dict]]:
    """-> per conversation, K candidates {"text", "finished", "n_tokens"}. The prompts must leave
    `sampling.max_new_tokens` of the context (`generate_to_db` skips those that do not)."""
    stops = tok.stop_ids
    s = SamplingConfig(sampling.max_new_tokens, sampling.temperature, sampling.top_k, sampling.top_p, stops)
    out = []
    for i in range(0, len(convs), batch_prompts):
        chunk = convs[i:i + batch_prompts]
        prompts = [render_chat(tok, c, add_generation_prompt=True)[0] for c in chunk for _ in range(k)]
        gens = generate(model, prompts, s, pad_id=tok.pad_id, generator=generator)
        for j in range(len(chunk)):
            cands = []
            for g in gens[j * k:(j + 1) * k]:
                finished = bool(g) and g[-1] in stops
                cands.append({"text": tok.decode(g[:-1] if finished else g, skip_special=True).strip(),
                              "finished": finished, "n_tokens": len(g)})
            out.append(cands)
    return out


def generate_to_db(ckpt: str, prompts_path: str, db: str, k: int, sampling: SamplingConfig, seed: int = 0,
                   device: str = "auto", rounds: int = 1, key: str = "max_new_tokens") -> dict:
    """K candidates per prompt (R rounds) into the database `db`. Prompts too long to leave
    `sampling.max_new_tokens` of the context are skipped and counted ("skipped_long"); `key` is
    the name of that setting as the caller's user types it, for messages."""
    if not 2 <= k <= 9:
        raise ValueError(f"k must be between 2 and 9, got {k}")
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, got {rounds}")
    ckpt_dir = checkpoint.resolve(ckpt)
    tok = Tokenizer.load(checkpoint.tokenizer_of(ckpt_dir))
    model = checkpoint.load_transformer(ckpt_dir)
    model.to(dist.pick_device(device)).eval()
    convs = read_prompts(prompts_path)
    # Lengths up front: a prompt that leaves fewer than max_new_tokens of the context is skipped.
    room = prompt_room(model.config.max_seq_len, sampling.max_new_tokens, key, f" of {ckpt_dir}")
    n_all = len(convs)
    convs, long = fit_prompts(tok, convs, room)
    if not convs:
        raise DataError(f"{prompts_path}: none of its {n_all} prompts fits: each may have at most {room} tokens (the "
                        f"context window of {model.config.max_seq_len} tokens of {ckpt_dir} less {key}="
                        f"{sampling.max_new_tokens}); the shortest has {min(long)} tokens")
    if long:
        print(f"feedback generate: {len(long)} of {n_all} prompts in {prompts_path} longer than {room} tokens skipped "
              f"(context window {model.config.max_seq_len} - {key} {sampling.max_new_tokens})")
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    per_round = [sample_candidates(model, tok, convs, k, sampling, gen) for _ in range(rounds)]
    store = FeedbackStore(db)
    settings = {"checkpoint": str(ckpt_dir.resolve()), "step": checkpoint.read_meta(ckpt_dir).get("step"), "k": k,
                "rounds": rounds, "seed": seed, "prompts": str(prompts_path), "max_new_tokens": sampling.max_new_tokens,
                "temperature": sampling.temperature, "top_k": sampling.top_k, "top_p": sampling.top_p}
    gid = store.add_generation(settings)
    for cands in per_round:
        for conv, cs in zip(convs, cands):
            prompt = next(m["content"] for m in reversed(conv) if m["role"] == "user")
            store.add_prompt(prompt, cs, generation_id=gid, messages=conv)
    store.close()
    return {"prompts": len(convs), "rounds": rounds, "candidates": len(convs) * k * rounds, "generation_id": gid,
            "skipped_long": len(long)}
