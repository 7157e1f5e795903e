"""Scoring with the reward model, shared by the stages that need it (reward, PPO, DPO's
batching aside, evaluation): encode (conversation, answer), score, load, the greedy
evaluation of a policy on held-out prompts, its collapse figures, and the KL of one policy to
another on answers sampled from the first."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch

from llmtrain import checkpoint
from llmtrain.data.packing import pack
from llmtrain.data.preference import Ranking
from llmtrain.data.prompts import last_user
from llmtrain.errors import CheckpointError
from llmtrain.generate import SamplingConfig, answer_text, generate, greedy_answers
from llmtrain.model import Transformer
from llmtrain.model.heads import ScoreModel
from llmtrain.rl import rollout_rows, sequence_kl, token_logprobs
from llmtrain.tokenizer import Tokenizer, render_answer, render_chat


def encode_answer(tok: Tokenizer, messages: list[dict], answer: str, max_len: int, finished: bool = True) -> list[int]:
    """The chat template of (conversation, answer); the head reads the last token: the answer's
    closing <|end|>, or for a cut-off answer its last word. Too long: keep <|bos|> and the last
    max_len - 1 tokens (the end is what is scored)."""
    ids = render_answer(tok, messages, answer, finished)[0]
    return ids if len(ids) <= max_len else [ids[0], *ids[-(max_len - 1):]]


def score_sequences(model, seqs: list[list[int]], pad_id: int, capacity: int, device) -> torch.Tensor:
    """The head at each sequence's last token, (N, n_out), in one padding-free forward: the
    sequences are packed into rows of `capacity` tokens (llmtrain/data/packing.py)."""
    b = pack(seqs, capacity, pad_id).to(device)
    return model(b.ids, None, b.mask, b.positions)[b.end_rows, b.end_cols]


def score_texts(model: ScoreModel, tok: Tokenizer, items: list[tuple], batch_size: int = 32,
                offset: float = 0.0) -> list[float]:
    """Rewards of (conversation, answer) or (conversation, answer, finished) items, minus
    `offset` (the normalisation). Answers are taken as finished unless said otherwise."""
    out: list[float] = []
    device = next(model.parameters()).device
    max_len = model.config.max_seq_len
    was = model.training
    model.eval()
    with torch.no_grad():
        for i in range(0, len(items), batch_size):
            seqs = [encode_answer(tok, it[0], it[1], max_len, *it[2:]) for it in items[i:i + batch_size]]
            out += (score_sequences(model, seqs, tok.pad_id, max_len, device)[:, 0].float() - offset).tolist()
    model.train(was)
    return out


def forward_rankings(model, tok: Tokenizer, rankings: list[Ranking], max_len: int, device):
    """One forward pass over every answer of every ranking -> rewards (N,) and, per ranking,
    the offset of its first answer in that vector. The answers are packed, not padded."""
    seqs, starts = [], []
    for r in rankings:
        starts.append(len(seqs))
        seqs += [encode_answer(tok, r.messages, t, max_len, f) for t, f in zip(r.texts, r.finished_flags)]
    return score_sequences(model, seqs, tok.pad_id, max_len, device)[:, 0], starts


def load_reward_model(ckpt: str | Path, device: str | torch.device = "cpu") -> tuple[ScoreModel, Tokenizer, dict]:
    """The reward model and its normalisation {"offset", "std"}: score - offset is the reward."""
    ckpt = checkpoint.resolve(ckpt)
    conf = checkpoint.read_config(ckpt)
    if conf.get("stage") != "reward":
        raise CheckpointError(f"{ckpt}: not a reward-model checkpoint (stage {conf.get('stage')!r})")
    model = ScoreModel(checkpoint.model_config(ckpt), 1)
    checkpoint.load_weights(ckpt, model)
    model.to(device).eval()
    return model, Tokenizer.load(checkpoint.tokenizer_of(ckpt)), conf.get("reward") or {"offset": 0.0, "std": 1.0}


@torch.no_grad()
def evaluate_policy(policy: Transformer, tok: Tokenizer, reward_model: ScoreModel, norm: dict, convs: list[list[dict]],
                    max_new_tokens: int, true_rule: Callable[[str, dict], float] | None = None) -> dict:
    """Greedy answers to held-out prompts: mean reward-model score and, with a stated rule
    (`true_rule(prompt, {"text", "finished"}) -> score`, e.g. a simulated annotator's from
    llmtrain/styles.py, which the caller picks), the mean 'true' score of that rule."""
    # Callers fit the prompts first (`data.prompts.fit_prompts`), so none is cut here.
    prompts = [render_chat(tok, c, add_generation_prompt=True)[0] for c in convs]
    answers = [{"text": t, "finished": f} for t, f in greedy_answers(policy, tok, prompts, max_new_tokens)]
    rewards = score_texts(reward_model, tok, [(c, a["text"], a["finished"]) for c, a in zip(convs, answers)],
                          offset=norm.get("offset", 0.0))
    out = {"reward": float(np.mean(rewards)), "answers": answers, "rewards": rewards,
           **collapse_stats([a["text"] for a in answers])}
    if true_rule:
        true = [true_rule(last_user(c), a) for c, a in zip(convs, answers)]
        out["true_score"] = float(np.mean(true))
        out["true_scores"] = true
    return out


@torch.no_grad()
def evaluate_sampled(policy: Transformer, tok: Tokenizer, reward_model: ScoreModel, norm: dict, convs: list[list[dict]],
                     max_new_tokens: int, n: int, true_rule: Callable[[str, dict], float] | None = None, seed: int = 0,
                     batch_size: int = 32) -> dict:
    """`n` answers per held-out prompt sampled at temperature 1 (what the policy writes, and what
    RL optimizes; greedy answers show only its most likely one): per prompt the mean
    reward-model score and, with a rule, the mean true score. Seeded: the same seed for every
    model, so a model compared with itself ties on every prompt."""
    s = SamplingConfig(max_new_tokens, 1.0, stop_ids=tok.stop_ids)
    g = torch.Generator().manual_seed(seed)
    prompts = [render_chat(tok, c, add_generation_prompt=True)[0] for c in convs]
    answers = []  # n passes over the prompts, in order: answer k is to prompt k % len(convs)
    for _ in range(n):
        for i in range(0, len(prompts), batch_size):
            outs = generate(policy, prompts[i:i + batch_size], s, pad_id=tok.pad_id, generator=g)
            answers += [dict(zip(("text", "finished"), answer_text(tok, o, s.stop_ids))) for o in outs]
    items = [(convs[k % len(convs)], a["text"], a["finished"]) for k, a in enumerate(answers)]
    rewards = np.array(score_texts(reward_model, tok, items, offset=norm.get("offset", 0.0))).reshape(n, -1).mean(0)
    out = {"reward": float(rewards.mean()), "rewards": rewards.tolist()}
    if true_rule:
        true = np.array([true_rule(last_user(c), a) for (c, _, _), a in zip(items, answers)]).reshape(n, -1).mean(0)
        out["true_score"], out["true_scores"] = float(true.mean()), true.tolist()
    return out


def collapse_stats(texts: list[str]) -> dict:
    """Signs of mode collapse in a model's answers to different prompts: `distinct`, the share
    of distinct answer texts; `distinct2`, distinct word bigrams over all bigrams of all answers
    (bigrams do not cross answers; 0 without any); `mean_words`, the mean number of words
    (whitespace-separated)."""
    if not texts:
        return {"distinct": 0.0, "distinct2": 0.0, "mean_words": 0.0}
    words = [t.split() for t in texts]
    bigrams = [tuple(w[i:i + 2]) for w in words for i in range(len(w) - 1)]
    return {"distinct": len(set(texts)) / len(texts),
            "distinct2": len(set(bigrams)) / len(bigrams) if bigrams else 0.0,
            "mean_words": float(np.mean([len(w) for w in words]))}


@torch.no_grad()
def sampled_kl(policy: Transformer, reference: Transformer, tok: Tokenizer, convs: list[list[dict]], max_new_tokens: int,
               seed: int = 0, batch_size: int = 32) -> dict:
    """KL(policy || reference) in nats per answer, estimated on one answer per prompt sampled
    from the policy at temperature 1 (seeded): the mean over prompts of the sum over answer
    tokens (the stop token included) of log pi - log pi_ref (`kl`, estimator k1) and of
    (r - 1) - log r, r = pi_ref / pi (`kl_k3`). Both models take the same rows, so a policy
    identical to its reference gives exactly 0."""
    s = SamplingConfig(max_new_tokens, 1.0, stop_ids=tok.stop_ids)
    g = torch.Generator().manual_seed(seed)
    device = next(policy.parameters()).device
    was = policy.training, reference.training
    policy.eval(), reference.eval()
    k1, k3 = [], []
    for i in range(0, len(convs), batch_size):
        prompts = [render_chat(tok, c, add_generation_prompt=True)[0] for c in convs[i:i + batch_size]]
        answers = generate(policy, prompts, s, pad_id=tok.pad_id, generator=g)
        ids, mask, pos, amask = (t.to(device) for t in rollout_rows(prompts, answers, tok.pad_id))
        logp = token_logprobs(policy(ids, mask, pos), ids)
        ref_logp = token_logprobs(reference(ids, mask, pos), ids)
        k1 += sequence_kl(logp, ref_logp, amask, "k1").tolist()
        k3 += sequence_kl(logp, ref_logp, amask, "k3").tolist()
    policy.train(was[0]), reference.train(was[1])
    return {"kl": float(np.mean(k1)) if k1 else 0.0, "kl_k3": float(np.mean(k3)) if k3 else 0.0}


def win_rate(b: list[float], a: list[float]) -> float:
    """Share of prompts where b scores above a; ties count half."""
    return float(np.mean([1.0 if y > x else 0.5 if y == x else 0.0 for x, y in zip(a, b)]))
