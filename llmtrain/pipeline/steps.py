"""One function per step of the run, in the order run() calls them: each sets where its stage
reads and writes (folders of the Run) and runs it. Each imports its stage inside the function
(lazily), so a bad pipeline YAML or --from is refused before torch loads."""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

from llmtrain.pipeline.answers import answers_side_by_side, style_check
from llmtrain.pipeline.checks import check_rankings, check_split
from llmtrain.pipeline.config import abs_path
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
    (r.root / "style.json").write_text(json.dumps(style, indent=2))
    for name, s in style["models"].items():
        print(f"style check: {s['hits']}/{s['n']} = {s['rate']:.0%} of {name} answers to held-out prompts show the style")


def candidates(cfg, base, r):
    from llmtrain.feedback.candidates import generate_to_db
    from llmtrain.files import publish
    from llmtrain.generate import SamplingConfig

    shutil.rmtree(r.feedback, ignore_errors=True)
    r.feedback.mkdir(parents=True)
    with open(r.prompts, "w") as fh:
        for msgs in feedback_convs(cfg, base):
            fh.write(json.dumps({"messages": msgs}) + "\n")
    f = cfg.feedback
    s = SamplingConfig(max_new_tokens=f.max_new_tokens, temperature=f.temperature, top_p=f.top_p)
    tmp = r.feedback / "feedback.db.tmp"
    res = generate_to_db(str(r.sft), str(r.prompts), str(tmp), f.k, s, seed=cfg.sft.run.seed, rounds=f.rounds)
    publish(tmp, r.db)
    print(f"candidates: {res['prompts']} prompts x {f.k} answers" + (f" x {f.rounds} rounds" if f.rounds > 1 else "")
          + f" from the SFT model -> {r.db}")


def rankings(cfg, r, human: bool):
    from llmtrain.feedback.export import export
    from llmtrain.feedback.store import FeedbackStore

    store = FeedbackStore(r.db)
    only = ""
    if human:
        check_split(cfg, db_convs(r.db), f"prompts in {r.db}")  # before the app opens
        wait_for_people(cfg, r, store)
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
    pending = r.rankings.with_name(r.rankings.name + ".pending")
    try:
        counts = export(store, pending, include_simulated=not human, only_simulated=only)
        check_rankings(cfg, pending, human, counts)
        pending.replace(r.rankings)
    finally:
        pending.unlink(missing_ok=True)
    people = counts["exported"] - counts["simulated"]
    print(f"rankings: {counts['exported']} exported ({people} by people, {counts['simulated']} by the rule "
          f"'{cfg.feedback.rule}' of a simulated annotator"
          + (f"; {counts['skipped']} skipped, left out" if counts["skipped"] else "") + f") -> {r.rankings}")


def reward(cfg, r):
    from llmtrain.stages import reward as stage

    c = cfg.reward
    c.init_from, c.run.out_dir, c.run.resume = str(r.sft), str(r.reward), True
    c.data.train = str(r.rankings)
    stage.main(c)


def rl(cfg, base, r, method: str):
    from llmtrain.stages import ppo

    c = getattr(cfg, method)
    c.policy, c.reward_model, c.run.out_dir, c.run.resume = str(r.sft), str(r.reward), str(r.root / method), True
    c.prompts = abs_path(cfg.sft.data.train, base)
    c.val_every = cfg.sft.data.val_every
    c.true_rule = c.true_rule or cfg.feedback.rule
    ppo.main(c)


def dpo(cfg, r):
    from llmtrain.stages import dpo as stage

    c = cfg.dpo
    c.policy, c.run.out_dir, c.run.resume = str(r.sft), str(r.dpo), True
    c.data = dataclasses.replace(cfg.reward.data, train=str(r.rankings))  # the same pairs as the reward model
    stage.main(c)


def evaluate(cfg, base, r):
    from llmtrain.stages import evaluate as stage

    e = cfg.evaluate
    convs = held_out(cfg, base)[1][: e.max_prompts or None]
    out = stage.compare(str(r.sft), {m: str(r.root / m) for m in cfg.methods}, str(r.reward), convs,
                        e.true_rule or cfg.feedback.rule, e.max_new_tokens)
    r.evaluation.write_text(json.dumps(out, indent=2))


def report(cfg, base, r, timings):
    from llmtrain.report import write_report

    write_report(r, cfg, timings, samples=answers_side_by_side(cfg, base, r))


def finished(run_dir: Path, max_steps: int) -> bool:
    """A training stage's output is complete: its last checkpoint reached max_steps."""
    from llmtrain import checkpoint

    steps = checkpoint.step_dirs(run_dir)
    return bool(steps) and checkpoint.read_meta(steps[-1])["step"] >= max_steps
