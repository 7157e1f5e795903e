"""Can the rankings train a reward model? The reward model and DPO hold out whole prompts; these
checks say so in one line, naming the keys as typed, before anyone ranks (on the prompts) and
before rankings.jsonl is written (on what was ranked). data.preference, which loads torch, is
imported lazily, inside the functions: the CLI checks a pipeline YAML before torch loads."""
from __future__ import annotations

from pathlib import Path

from llmtrain.errors import ConfigError, DataError


def batch_need(cfg) -> tuple[int, str]:
    """The fewest training rankings the reward model (and DPO, when it runs) can take: one
    global batch. -> (rankings, the keys that set it, as typed on the command line)."""
    needs = [(cfg.reward.run.batch_size * cfg.reward.run.grad_accum, "reward.run.batch_size"
              + (" x reward.run.grad_accum" if cfg.reward.run.grad_accum != 1 else ""))]
    if "dpo" in cfg.methods:
        needs.append((cfg.dpo.run.batch_size * cfg.dpo.run.grad_accum, "dpo.run.batch_size"
                      + (" x dpo.run.grad_accum" if cfg.dpo.run.grad_accum != 1 else "")))
    return max(needs, key=lambda n: n[0])


def split_counts(cfg, convs: list) -> tuple[int, int]:
    """(training side, held-out side) of the reward model's and DPO's split by prompt."""
    from llmtrain.data.preference import prompt_key

    every = cfg.reward.data.val_every
    held = sum(int(prompt_key(m), 16) % every == 0 for m in convs)
    return len(convs) - held, held


def check_split(cfg, convs: list, what: str) -> None:
    """The reward model and DPO hold out whole prompts (those whose hash is 0 mod
    reward.data.val_every). Checked on the prompts before anyone ranks them: if no prompt can
    fall on the held-out side, or too few on the training side for one batch, no ranking can
    help, so say so now and name the keys as they are typed (reward.data.val_every=...)."""
    d = cfg.reward.data
    if d.val:  # a held-out file of its own: nothing is split off the rankings
        return
    if d.val_every < 2:
        raise ConfigError(f"reward.data.val_every={d.val_every}: must be at least 2 (1 prompt in N is held out "
                          "for the reward model), e.g. reward.data.val_every=10")
    train, held = split_counts(cfg, convs)
    if held == 0:
        raise ConfigError(f"reward.data.val_every={d.val_every}: none of the {len(convs)} {what} falls in the reward "
                          f"model's held-out split (1 prompt in {d.val_every}, by a hash of the prompt); lower it "
                          f"(e.g. reward.data.val_every=2) or rank more prompts (feedback.max_prompts)")
    need, key = batch_need(cfg)
    if train < need:
        raise ConfigError(f"only {train} of the {len(convs)} {what} fall on the reward model's training side "
                          f"(reward.data.val_every={d.val_every} holds out {held}): fewer than one batch of {need} "
                          f"({key}); lower {key.split(' x ')[0]} or raise reward.data.val_every or feedback.max_prompts")


def check_rankings(cfg, path: Path, human: bool, counts: dict) -> None:
    """What was ranked gives the reward model a held-out pair and a training batch (else it
    would fail at its start, naming keys of the `reward` command rather than the pipeline's)."""
    from llmtrain.data.preference import read_rankings

    d = cfg.reward.data
    rankings, _ = read_rankings(path)
    usable = [x for x in rankings if x.status == "ranked" and (d.include_simulated or not x.simulated)
              and x.pairs(d.min_score_gap)]
    again = "; run the same command again to reopen the round (what was judged is kept)"
    if human and not usable:
        raise DataError(f"rankings: the round ended with no prompt ranked by a person ({counts['all_bad']} marked all "
                        f"unacceptable, {counts['skipped']} skipped): nothing to train the reward model on" + again)
    if not usable:
        raise DataError(f"rankings: none of the {len(rankings)} rankings gives a preference pair"
                        + (" (reward.data.include_simulated=false leaves out the simulated annotator's)"
                           if not d.include_simulated else ""))
    if d.val:
        return
    train, held = split_counts(cfg, [x.messages for x in usable])
    need, key = batch_need(cfg)
    who = "people's rankings" if human else "rankings"
    if held == 0:
        raise DataError(f"rankings: none of the {len(usable)} {who} with a preference pair is of a prompt in the "
                        f"reward model's held-out split (1 in reward.data.val_every={d.val_every}); rank more, or lower "
                        f"reward.data.val_every" + (again if human else ""))
    if train < need:
        raise DataError(f"rankings: {train} {who} with a preference pair on the training side, fewer than one batch "
                        f"of {need} ({key}); rank more, or lower {key.split(' x ')[0]}" + (again if human else ""))
