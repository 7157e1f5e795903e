"""One function per step of the run, in the order run() calls them: each sets where its stage
reads and writes (folders of the Run) and runs it. Each imports its stage inside the function
(lazily), so a bad pipeline YAML or --from is refused before torch loads."""
from __future__ import annotations

import copy
import dataclasses
import json
import shutil
from pathlib import Path

from llmtrain.files import write_file
from llmtrain.pipeline.answers import answers_side_by_side, style_check
from llmtrain.pipeline.checks import check_rankings, check_split
from llmtrain.pipeline.config import abs_path, method_of
from llmtrain.pipeline.human import wait_for_people
from llmtrain.pipeline.prompts import db_convs, feedback_convs, held_out


def tokenizer(cfg, base, r):
    from llmtrain.data.corpus import iter_documents
    from llmtrain.tokenizer import train_tokenizer

    c = cfg.tokenizer
    train_tokenizer(iter_documents([abs_path(i, base) for i in c.inputs], c.jsonl_field), c.vocab_size, r.tokenizer,
                    c.min_frequency, c.max_chars)


def prepare(cfg, base, r):
    from llmtrain.data.pretrain import prepare as prepare_shards

    c = cfg.prepare
    prepare_shards([abs_path(i, base) for i in c.inputs], str(r.tokenizer), str(r.data), c.jsonl_field, c.val_every, c.shard_tokens)


def pretrain(cfg, r):
    from llmtrain.stages import pretrain as stage

    c = cfg.pretrain
    c.data.shards, c.run.out_dir, c.run.resume = str(r.data), str(r.pretrain), True
    stage.main(c)


def sft(cfg, base, r):
    from llmtrain.stages import sft as stage

    c = cfg.sft
    c.init_from, c.run.out_dir, c.run.resume = str(r.pretrain), str(r.sft), True
    c.data.train = abs_path(c.data.train, base)
    c.data.val = abs_path(c.data.val, base)
    if not finished(r.sft, c.run.max_steps):
        stage.main(c)
    style = style_check(cfg, base, {"pretrain": r.pretrain, "sft": r.sft})
    write_file(r.root / "style.json", json.dumps(style, indent=2))
    for name, s in style["models"].items():
        print(f"style check: {s['hits']}/{s['n']} = {s['rate']:.0%} of {name} answers to held-out prompts show the style")


def candidates(cfg, base, r, rd=None):
    """K answers per prompt to rank, from the SFT model (round 1) or the last round's policy."""
    from llmtrain.feedback.candidates import generate_to_db
    from llmtrain.files import publish
    from llmtrain.generate import SamplingConfig

    rd = rd or r.round(1)
    shutil.rmtree(rd.feedback, ignore_errors=True)
    rd.feedback.mkdir(parents=True)
    with open(rd.prompts, "w") as fh:
        for msgs in feedback_convs(cfg, base):
            fh.write(json.dumps({"messages": msgs}) + "\n")
    f = cfg.feedback
    s = SamplingConfig(max_new_tokens=f.max_new_tokens, temperature=f.temperature, top_p=f.top_p)
    tmp = rd.feedback / "feedback.db.tmp"
    res = generate_to_db(str(rd.writer), str(rd.prompts), str(tmp), f.k, s, seed=cfg.sft.run.seed + rd.n - 1,
                         rounds=f.rounds)
    publish(tmp, rd.db)
    print(f"candidates: {res['prompts']} prompts x {f.k} answers" + (f" x {f.rounds} rounds" if f.rounds > 1 else "")
          + f" from {rd.writer_name} -> {rd.db}")


def rankings(cfg, r, human: bool, rd=None):
    from llmtrain.feedback.export import export
    from llmtrain.feedback.store import FeedbackStore

    rd = rd or r.round(1)
    store = FeedbackStore(rd.db)
    only = ""
    if human:
        check_split(cfg, db_convs(rd.db), f"prompts in {rd.db}")  # before the app opens
        if rd.n > 1:
            r.cleanup.close()  # the last round's app gives its port to this round's
        wait_for_people(cfg, rd, store)
    else:
        from llmtrain.feedback.simulate import simulate

        res = simulate(store, cfg.feedback.rule, redo=True)
        print(f"rankings: simulated annotator '{res['annotator']}' (rule {cfg.feedback.rule}) ranked {res['ranked']} prompts"
              + (f", changed {res['changed']} earlier rankings" if res["changed"] else ""))
        # Of the simulated annotators only this rule's: after `--from rankings` with another
        # rule, the database also holds the earlier rule's rankings, which must not be mixed in.
        only = res["annotator"]
    # --human trains on people's rankings only (a simulated annotator's, say from an earlier
    # run into the same database, are left out). Written aside and checked first: a set of
    # rankings the reward model cannot use never becomes rankings.jsonl.
    pending = rd.rankings.with_name(rd.rankings.name + ".pending")
    try:
        counts = export(store, pending, include_simulated=not human, only_simulated=only)
        check_rankings(cfg, pending, human, counts)
        pending.replace(rd.rankings)
    finally:
        pending.unlink(missing_ok=True)
    people = counts["exported"] - counts["simulated"]
    print(f"rankings: {counts['exported']} exported ({people} by people, {counts['simulated']} by the rule "
          f"'{cfg.feedback.rule}' of a simulated annotator"
          + (f"; {counts['skipped']} skipped, left out" if counts["skipped"] else "") + f") -> {rd.rankings}")
    if rd.n > 1:  # the reward model continues on every ranking so far
        lines = [p.read_text(encoding="utf-8") for p in rd.rankings_so_far]
        write_file(rd.all_rankings, "".join(lines))
        print(f"rankings: {sum(t.count(chr(10)) for t in lines)} rankings of rounds 1-{rd.n} -> {rd.all_rankings}")


def reward(cfg, r, rd=None):
    """Round 1: the SFT model with a new head on round 1's rankings. Round n: the last round's
    reward model continues on every ranking so far (its zero still set by the SFT model's answers)."""
    from llmtrain.stages import reward as stage

    rd = rd or r.round(1)
    c = copy.deepcopy(cfg.reward)
    c.init_from, c.run.out_dir, c.run.resume = str(rd.reward_from), str(rd.reward), True
    c.norm_policy = str(r.sft)
    c.data.train = str(rd.all_rankings)
    stage.main(c)


def rl(cfg, base, r, method: str, rd=None):
    """Round 1: from the SFT model (also the KL reference). Round n: from the last round's
    policy, which is then the reference, against this round's reward model."""
    from llmtrain.stages import ppo

    rd = rd or r.round(1)
    c = copy.deepcopy(getattr(cfg, method))
    c.policy, c.reward_model, c.run.out_dir, c.run.resume = str(rd.writer), str(rd.reward), str(rd.policy(method)), True
    c.prompts = abs_path(cfg.sft.data.train, base)
    c.val_every = cfg.sft.data.val_every
    c.true_rule = c.true_rule or cfg.feedback.rule
    ppo.main(c)


def dpo(cfg, r, rd=None):
    from llmtrain.stages import dpo as stage

    rd = rd or r.round(1)
    c = copy.deepcopy(cfg.dpo)
    c.policy, c.run.out_dir, c.run.resume = str(rd.writer), str(rd.policy("dpo")), True
    c.data = dataclasses.replace(cfg.reward.data, train=str(rd.all_rankings))  # the same pairs as the reward model
    stage.main(c)


def evaluate(cfg, base, r):
    from llmtrain.stages import evaluate as stage

    e = cfg.evaluate
    convs = held_out(cfg, base)[1][: e.max_prompts or None]
    models = {m: str(r.root / m) for m in cfg.methods}
    if cfg.rounds > 1:  # the last round's policy too, by the first reward model like the others
        m = method_of(cfg)
        models[f"{m}@{cfg.rounds}"] = str(r.round(cfg.rounds, m).policy(m))
    out = stage.compare(str(r.sft), models, str(r.reward), convs, e.true_rule or cfg.feedback.rule, e.max_new_tokens,
                        e.samples)
    write_file(r.evaluation, json.dumps(out, indent=2))


def report(cfg, base, r, timings):
    from llmtrain.report import write_report

    write_report(r, cfg, timings, samples=answers_side_by_side(cfg, base, r))


def finished(run_dir: Path, max_steps: int) -> bool:
    """A training stage's output is complete: its last checkpoint reached max_steps."""
    from llmtrain import checkpoint

    steps = checkpoint.step_dirs(run_dir)
    return bool(steps) and checkpoint.read_meta(steps[-1])["step"] >= max_steps
