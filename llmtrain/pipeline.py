"""Run the whole chain from one YAML; `llmtrain demo` runs the shipped default.

    tokenizer -> prepare -> pretrain -> sft -> feedback (candidates, then rankings by the
    simulated annotator or by people in the app) -> reward -> ppo / grpo / rloo / dpo (the
    `methods` chosen, each from the same SFT model) -> evaluate -> report

Each stage's own config is nested in the pipeline config; the pipeline only decides where
each stage writes (folders inside one run directory) and hands outputs on through them.
A stage whose output is complete is skipped, so a killed pipeline continues where it
stopped (training stages resume from their last step checkpoint); `--from STAGE` deletes
that stage's output and everything after it, and reruns from there.

Each step imports its stage inside its function (lazily), so a bad pipeline YAML or --from is
refused before torch loads; only the CLI imports this module (tests/unit/test_layers.py).
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import secrets
import select
import shutil
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from llmtrain.config import (NON_NEGATIVE, POSITIVE, TEMPERATURE, TOP_P, WRITABLE_DIR, DPOConfig, EvaluateConfig,
                             PPOConfig, PrepareConfig, PretrainConfig, RewardConfig, Rule, SFTConfig, TokenizerConfig,
                             check, load_config, to_dict)
from llmtrain.errors import ConfigError, DataError, LlmtrainError
from llmtrain.metrics import fmt_duration

REPO = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO / "configs" / "demo.yaml"
RL_METHODS = ["ppo", "grpo", "rloo", "dpo"]
APP_START_TIMEOUT = 30.0  # --human: seconds the ranking app may take to come up before it is an error
STAGES = ["tokenizer", "prepare", "pretrain", "sft", "candidates", "rankings", "reward", *RL_METHODS, "evaluate", "report"]


@dataclass
class FeedbackStageConfig:
    prompts: str = "data/sft/aristocrat.jsonl"  # its SFT-training side gives the prompts to rank
    max_prompts: int = check(120, NON_NEGATIVE | "0: all")  # 0: all of them
    k: int = check(4, Rule(lambda v: 2 <= v <= 9, "between 2 and 9"))
    rounds: int = check(1, POSITIVE)  # each prompt answered this many times (K fresh answers, ranked separately)
    max_new_tokens: int = check(40, POSITIVE)
    temperature: float = check(1.0, TEMPERATURE)
    top_p: float = check(1.0, TOP_P)
    rule: str = "aristocrat"  # the simulated annotator's rule (llmtrain/styles.py)
    # --human: where the ranking app listens (127.0.0.1; 0: any free port)
    port: int = check(8000, Rule(lambda v: 0 <= v <= 65535, "a port number, 0 to 65535 (0: any free port)"))


@dataclass
class PipelineConfig:
    run_dir: str = check("", WRITABLE_DIR)  # empty: runs/<name>-<date>-<time>
    name: str = "demo"
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    feedback: FeedbackStageConfig = field(default_factory=FeedbackStageConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    methods: list[str] = field(default_factory=lambda: ["ppo", "grpo", "dpo"])  # which of ppo grpo rloo dpo run
    ppo: PPOConfig = field(default_factory=PPOConfig)
    grpo: PPOConfig = field(default_factory=lambda: PPOConfig(algorithm="grpo"))
    rloo: PPOConfig = field(default_factory=lambda: PPOConfig(algorithm="rloo"))
    dpo: DPOConfig = field(default_factory=DPOConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    sample_prompts: int = check(6, NON_NEGATIVE)  # held-out prompts answered by every model in the report
    style_eval_prompts: int = check(0, NON_NEGATIVE | "0: all")  # held-out SFT prompts whose answers are style-checked (0: all)


def stages_of(cfg: PipelineConfig) -> list[str]:
    """The stages this config runs: all of STAGES but the RL methods it does not choose."""
    return [s for s in STAGES if s not in RL_METHODS or s in cfg.methods]


def _abs(path: str, base: Path) -> str:
    """A config path relative to `base`; empty stays empty."""
    if not path:
        return ""
    p = Path(path)
    return str(p if p.is_absolute() else base / p)


class Run:
    """Where every stage of one pipeline run writes."""

    def __init__(self, root: Path):
        self.root = root
        self.tokenizer = root / "tokenizer" / "tokenizer.json"
        self.data = root / "data"
        self.pretrain, self.sft = root / "pretrain", root / "sft"
        self.feedback = root / "feedback"
        self.db, self.prompts, self.rankings = self.feedback / "feedback.db", self.feedback / "prompts.jsonl", self.feedback / "rankings.jsonl"
        self.reward, self.ppo, self.dpo = root / "reward", root / "ppo", root / "dpo"
        self.grpo, self.rloo = root / "grpo", root / "rloo"
        self.evaluation = root / "evaluation.json"
        self.report = root / "report.md"
        self.cleanup = contextlib.ExitStack()  # what the run stops at its end (the ranking app of --human)

    def outputs(self, stage: str) -> list[Path]:
        return {"tokenizer": [self.tokenizer.parent], "prepare": [self.data], "pretrain": [self.pretrain],
                "sft": [self.sft, self.root / "style.json"], "candidates": [self.feedback],
                "rankings": [self.rankings], "reward": [self.reward],
                **{m: [self.root / m] for m in RL_METHODS},
                "evaluate": [self.evaluation], "report": [self.report, self.root / "report.html", self.root / "plots"]}[stage]


def run(cfg: PipelineConfig, base: Path = REPO, from_stage: str = "", human: bool = False) -> Path:
    """Run the chain; data paths in the config are relative to `base` (the repo for the demo)."""
    if from_stage and from_stage not in STAGES:
        raise ConfigError(f"--from {from_stage}: not a stage ({', '.join(STAGES)})")
    unknown = [m for m in cfg.methods if m not in RL_METHODS]
    if unknown or not cfg.methods:
        raise ConfigError(f"methods: {unknown or 'empty'}; choose from {', '.join(RL_METHODS)}")
    for m in ("ppo", "grpo", "rloo"):
        if getattr(cfg, m).algorithm != m:
            raise ConfigError(f"{m}.algorithm={getattr(cfg, m).algorithm}: the {m} section runs {m}")
    root = Path(cfg.run_dir) if cfg.run_dir else Path("runs") / f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    r = Run(root)
    redo = STAGES[STAGES.index(from_stage):] if from_stage else []
    if "rankings" in redo or not r.rankings.is_file():
        # Checked before anything is trained or anyone ranks: a split that cannot work, or a
        # busy port, is a one-line error now, not after minutes of training or of ranking.
        if r.db.is_file() and "candidates" not in redo:
            convs, what = _db_convs(r.db), f"prompts in {r.db}"
        else:
            first, rounds = _feedback_convs(cfg, base), max(1, cfg.feedback.rounds)
            convs, what = first * rounds, "prompts to rank" + (f" ({len(first)} x {rounds} rounds)" if rounds > 1 else "")
        _check_split(cfg, convs, what)
        if human:
            _bind(cfg.feedback.port).close()
    root.mkdir(parents=True, exist_ok=True)
    if from_stage:
        for s in STAGES[STAGES.index(from_stage):]:
            for p in r.outputs(s):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    print(f"pipeline '{cfg.name}': all outputs in {root.resolve()}")
    timing_path = root / "timings.json"
    timings: dict[str, float] = json.loads(timing_path.read_text()) if timing_path.exists() else {}
    (root / "pipeline.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))

    def stage(name: str, done: bool, fn) -> None:
        if done:
            print(f"[{name}] complete, skipped")
            return
        print(f"\n[{name}] ...", flush=True)
        t = time.time()
        fn()
        timings[name] = round(time.time() - t, 1)
        timing_path.write_text(json.dumps(timings, indent=2))
        print(f"[{name}] done in {fmt_duration(timings[name])}", flush=True)

    with r.cleanup:  # --human: the ranking app serves (saying the round is over) until the run ends
        stage("tokenizer", r.tokenizer.is_file(), lambda: _tokenizer(cfg, base, r))
        stage("prepare", (r.data / "meta.json").is_file(), lambda: _prepare(cfg, base, r))
        stage("pretrain", _finished(r.pretrain, cfg.pretrain.run.max_steps), lambda: _pretrain(cfg, r))
        stage("sft", _finished(r.sft, cfg.sft.run.max_steps) and (root / "style.json").is_file(), lambda: _sft(cfg, base, r))
        stage("candidates", _candidates_done(r), lambda: _candidates(cfg, base, r))
        stage("rankings", r.rankings.is_file(), lambda: _rankings(cfg, r, human))
        stage("reward", _finished(r.reward, cfg.reward.run.max_steps), lambda: _reward(cfg, r))
        for m in ("ppo", "grpo", "rloo"):
            if m in cfg.methods:
                stage(m, _finished(r.root / m, getattr(cfg, m).run.max_steps), lambda m=m: _rl(cfg, base, r, m))
        if "dpo" in cfg.methods:
            stage("dpo", _finished(r.dpo, cfg.dpo.run.max_steps), lambda: _dpo(cfg, r))
        stage("evaluate", r.evaluation.is_file(), lambda: _evaluate(cfg, base, r))
        stage("report", r.report.is_file(), lambda: _report(cfg, base, r, timings))
    total = sum(timings.values())
    print("\ntime per stage: " + ", ".join(f"{k} {fmt_duration(v)}" for k, v in timings.items()) +
          f"; total {fmt_duration(total)}")
    print(f"report: {r.report.resolve()} (and report.html)")
    return root


# ----------------------------------------------------------------------------- the stages


def _tokenizer(cfg, base, r):
    from llmtrain.data.corpus import iter_documents
    from llmtrain.tokenizer import train_tokenizer

    c = cfg.tokenizer
    train_tokenizer(iter_documents([_abs(i, base) for i in c.inputs], c.jsonl_field), c.vocab_size, r.tokenizer,
                    c.min_frequency, c.max_chars)


def _prepare(cfg, base, r):
    from llmtrain.data.pretrain import prepare

    c = cfg.prepare
    prepare([_abs(i, base) for i in c.inputs], str(r.tokenizer), str(r.data), c.jsonl_field, c.val_every, c.shard_tokens)


def _pretrain(cfg, r):
    from llmtrain.stages import pretrain

    c = cfg.pretrain
    c.data.shards, c.run.out_dir, c.run.resume = str(r.data), str(r.pretrain), True
    pretrain.main(c)


def _sft(cfg, base, r):
    from llmtrain.stages import sft

    c = cfg.sft
    c.init_from, c.run.out_dir, c.run.resume = str(r.pretrain), str(r.sft), True
    c.data.train = _abs(c.data.train, base)
    c.data.val = _abs(c.data.val, base)
    if not _finished(r.sft, c.run.max_steps):
        sft.main(c)
    style = style_check(cfg, base, {"pretrain": r.pretrain, "sft": r.sft})
    (r.root / "style.json").write_text(json.dumps(style, indent=2))
    for name, s in style["models"].items():
        print(f"style check: {s['hits']}/{s['n']} = {s['rate']:.0%} of {name} answers to held-out prompts show the style")


def _held_out(cfg, base) -> tuple[list, list]:
    """The SFT data's split into (train, held-out) conversations: the held-out prompts are
    never trained on by any stage and are where every model is compared."""
    from llmtrain.data.prompts import read_prompts
    from llmtrain.data.jsonl import split

    return split(read_prompts(_abs(cfg.sft.data.train, base)), cfg.sft.data.val_every)


def _feedback_convs(cfg, base) -> list:
    """The conversations whose answers are ranked (each asked feedback.rounds times)."""
    if _abs(cfg.feedback.prompts, base) == _abs(cfg.sft.data.train, base):
        convs = _held_out(cfg, base)[0]  # the SFT training side: held-out prompts stay unseen
    else:
        from llmtrain.data.prompts import read_prompts

        convs = read_prompts(_abs(cfg.feedback.prompts, base))
    return convs[: cfg.feedback.max_prompts or None]


def _candidates(cfg, base, r):
    from llmtrain.feedback.candidates import generate_to_db
    from llmtrain.files import publish
    from llmtrain.generate import SamplingConfig

    shutil.rmtree(r.feedback, ignore_errors=True)
    r.feedback.mkdir(parents=True)
    with open(r.prompts, "w") as fh:
        for msgs in _feedback_convs(cfg, base):
            fh.write(json.dumps({"messages": msgs}) + "\n")
    f = cfg.feedback
    s = SamplingConfig(max_new_tokens=f.max_new_tokens, temperature=f.temperature, top_p=f.top_p)
    tmp = r.feedback / "feedback.db.tmp"
    res = generate_to_db(str(r.sft), str(r.prompts), str(tmp), f.k, s, seed=cfg.sft.run.seed, rounds=f.rounds)
    publish(tmp, r.db)
    print(f"candidates: {res['prompts']} prompts x {f.k} answers" + (f" x {f.rounds} rounds" if f.rounds > 1 else "")
          + f" from the SFT model -> {r.db}")


def _candidates_done(r) -> bool:
    return r.db.is_file()


def _rankings(cfg, r, human: bool):
    from llmtrain.feedback.export import export
    from llmtrain.feedback.store import FeedbackStore

    store = FeedbackStore(r.db)
    only = ""
    if human:
        _check_split(cfg, _db_convs(r.db), f"prompts in {r.db}")  # before the app opens
        _wait_for_people(cfg, r, store)
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
        _check_rankings(cfg, pending, human, counts)
        pending.replace(r.rankings)
    finally:
        pending.unlink(missing_ok=True)
    people = counts["exported"] - counts["simulated"]
    print(f"rankings: {counts['exported']} exported ({people} by people, {counts['simulated']} by the rule "
          f"'{cfg.feedback.rule}' of a simulated annotator"
          + (f"; {counts['skipped']} skipped, left out" if counts["skipped"] else "") + f") -> {r.rankings}")


def _db_convs(db: Path) -> list:
    """The conversation of every prompt row of a feedback database (a prompt of R rounds R times)."""
    from llmtrain.feedback.store import FeedbackStore

    store = FeedbackStore(db)
    try:
        return [store.prompt(pid)["messages"] for pid in store.prompt_ids()]
    finally:
        store.close()


def _batch_need(cfg) -> tuple[int, str]:
    """The fewest training rankings the reward model (and DPO, when it runs) can take: one
    global batch. -> (rankings, the keys that set it, as typed on the command line)."""
    needs = [(cfg.reward.run.batch_size * cfg.reward.run.grad_accum, "reward.run.batch_size"
              + (" x reward.run.grad_accum" if cfg.reward.run.grad_accum != 1 else ""))]
    if "dpo" in cfg.methods:
        needs.append((cfg.dpo.run.batch_size * cfg.dpo.run.grad_accum, "dpo.run.batch_size"
                      + (" x dpo.run.grad_accum" if cfg.dpo.run.grad_accum != 1 else "")))
    return max(needs, key=lambda n: n[0])


def _split_counts(cfg, convs: list) -> tuple[int, int]:
    """(training side, held-out side) of the reward model's and DPO's split by prompt."""
    from llmtrain.data.preference import prompt_key

    every = cfg.reward.data.val_every
    held = sum(int(prompt_key(m), 16) % every == 0 for m in convs)
    return len(convs) - held, held


def _check_split(cfg, convs: list, what: str) -> None:
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
    train, held = _split_counts(cfg, convs)
    if held == 0:
        raise ConfigError(f"reward.data.val_every={d.val_every}: none of the {len(convs)} {what} falls in the reward "
                          f"model's held-out split (1 prompt in {d.val_every}, by a hash of the prompt); lower it "
                          f"(e.g. reward.data.val_every=2) or rank more prompts (feedback.max_prompts)")
    need, key = _batch_need(cfg)
    if train < need:
        raise ConfigError(f"only {train} of the {len(convs)} {what} fall on the reward model's training side "
                          f"(reward.data.val_every={d.val_every} holds out {held}): fewer than one batch of {need} "
                          f"({key}); lower {key.split(' x ')[0]} or raise reward.data.val_every or feedback.max_prompts")


def _check_rankings(cfg, path: Path, human: bool, counts: dict) -> None:
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
    train, held = _split_counts(cfg, [x.messages for x in usable])
    need, key = _batch_need(cfg)
    who = "people's rankings" if human else "rankings"
    if held == 0:
        raise DataError(f"rankings: none of the {len(usable)} {who} with a preference pair is of a prompt in the "
                        f"reward model's held-out split (1 in reward.data.val_every={d.val_every}); rank more, or lower "
                        f"reward.data.val_every" + (again if human else ""))
    if train < need:
        raise DataError(f"rankings: {train} {who} with a preference pair on the training side, fewer than one batch "
                        f"of {need} ({key}); rank more, or lower {key.split(' x ')[0]}" + (again if human else ""))


def _bind(port: int):
    """A listening socket on 127.0.0.1:port for the ranking app, or a one-line error naming
    feedback.port. Bound here, not inside uvicorn's thread, so a busy port never leaves the
    pipeline waiting for a server that is not there."""
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ConfigError(f"feedback.port={port}: not a port number (0-65535; 0 takes any free port), e.g. feedback.port=8001")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a just-stopped run's port is free again
    try:
        sock.bind(("127.0.0.1", port))
    except OSError as e:
        sock.close()
        why = {errno.EADDRINUSE: "is in use by another program", errno.EACCES: "needs privileges to listen on"}.get(
            e.errno, f"cannot be listened on ({e.strerror})")
        other = 8001 if port != 8001 else 8002
        raise ConfigError(f"feedback.port={port}: port {port} on 127.0.0.1 {why}; choose another on the command line, "
                          f"e.g. feedback.port={other}") from None
    return sock


def _start_app(db: Path, port: int, cleanup: contextlib.ExitStack) -> tuple[int, "threading.Thread"]:
    """Start the ranking app in a thread on its own socket; return the port it listens on and
    the thread (alive while the app serves).
    Stopped when `cleanup` closes (the end of the run). A server that does not come up is an
    error at once, never a wait."""
    import uvicorn

    from llmtrain.feedback.app import create_app

    sock = _bind(port)
    cleanup.callback(sock.close)
    server = uvicorn.Server(uvicorn.Config(create_app(str(db)), log_level="warning", access_log=False,
                                           timeout_graceful_shutdown=5))
    failed: list[BaseException] = []

    def serve() -> None:
        try:
            server.run(sockets=[sock])
        except BaseException as e:  # uvicorn exits with SystemExit when it cannot start
            failed.append(e)

    thread = threading.Thread(target=serve, name="ranking-app", daemon=True)
    thread.start()

    def stop() -> None:
        server.should_exit = True
        thread.join(timeout=10)

    cleanup.callback(stop)
    deadline = time.monotonic() + APP_START_TIMEOUT
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            why = f"{type(failed[0]).__name__}: {failed[0]}" if failed else f"not up after {APP_START_TIMEOUT:g} s"
            raise ConfigError(f"feedback.port={port}: the ranking app did not start ({why})")
        time.sleep(0.02)
    return sock.getsockname()[1], thread


def _wait_for_people(cfg, r, store):
    """--human: start the ranking app, print its address and tokens, and return when every
    prompt has been judged by a person (ranked, all unacceptable or skipped: a skip leaves the
    prompt out), when an admin closes the round at /admin, or when Enter is pressed with at
    least one ranking. Says which prompts are still open whenever that changes."""
    # The round is closed only while this run goes on (pages then say it is over); a later
    # run, or `llmtrain feedback serve`, finds it open, with what was judged kept.
    r.cleanup.callback(store.reopen_round)  # registered first: runs after the app has stopped
    port, app = _start_app(r.db, cfg.feedback.port, r.cleanup)  # a busy port: an error before anything is written
    store.reopen_round()
    tag = f"{int(time.time())}-{secrets.token_hex(2)}"  # a rerun within the same second makes new names too
    admin = store.add_annotator(f"admin-{tag}", is_admin=True)
    person = store.add_annotator(f"annotator-{tag}")
    total = len(store.prompt_ids())
    interactive = sys.stdin is not None and sys.stdin.isatty()
    print(f"\nThe ranking app is at http://127.0.0.1:{port}/\n  annotator token: {person}\n"
          f"  admin token:     {admin}\n(add more annotators with: llmtrain feedback add-annotator NAME --db {r.db})\n"
          f"Rank the {total} prompts (Skip leaves one out). The pipeline goes on when every prompt is judged by someone, "
          f"or when an admin closes the round at http://127.0.0.1:{port}/admin"
          + (", or press Enter to go on with what is ranked." if interactive else "."), flush=True)
    last = None
    while True:
        open_ids = store.open_prompts()
        closed = store.round_closed()
        people = [j for j in store.judgements() if not j["simulated"]]
        ranked = len({j["prompt_id"] for j in people if j["status"] == "ranked"})
        state = (tuple(open_ids), closed, ranked)
        if state != last:
            last = state
            judged = total - len(open_ids)
            print(f"rankings: {judged} of {total} prompts judged by people ({ranked} ranked)"
                  + (f"; {len(open_ids)} still open: " + ", ".join(f"#{i}" for i in open_ids[:20])
                     + (" …" if len(open_ids) > 20 else "") if open_ids else ""), flush=True)
        if closed:
            print("rankings: an admin closed the round; going on with what people ranked", flush=True)
            return
        if not open_ids:
            store.close_round()  # the page now says the round is over
            return
        if not app.is_alive():  # nobody can rank any more: say so rather than wait
            raise LlmtrainError(f"rankings: the ranking app on port {port} stopped; run the same command again to "
                                "reopen the round (what was judged is kept)")
        if not interactive:
            time.sleep(1.0)
        elif select.select([sys.stdin], [], [], 1.0)[0]:
            sys.stdin.readline()
            if ranked:
                store.close_round()
                return
            print("no rankings yet: rank at least one prompt first")


def _reward(cfg, r):
    from llmtrain.stages import reward

    c = cfg.reward
    c.init_from, c.run.out_dir, c.run.resume = str(r.sft), str(r.reward), True
    c.data.train = str(r.rankings)
    reward.main(c)


def _rl(cfg, base, r, method: str):
    from llmtrain.stages import ppo

    c = getattr(cfg, method)
    c.policy, c.reward_model, c.run.out_dir, c.run.resume = str(r.sft), str(r.reward), str(r.root / method), True
    c.prompts = _abs(cfg.sft.data.train, base)
    c.val_every = cfg.sft.data.val_every
    c.true_rule = c.true_rule or cfg.feedback.rule
    ppo.main(c)


def _dpo(cfg, r):
    from llmtrain.stages import dpo

    c = cfg.dpo
    c.policy, c.run.out_dir, c.run.resume = str(r.sft), str(r.dpo), True
    c.data = dataclasses.replace(cfg.reward.data, train=str(r.rankings))  # the same pairs as the reward model
    dpo.main(c)


def _evaluate(cfg, base, r):
    from llmtrain.stages import evaluate

    e = cfg.evaluate
    convs = _held_out(cfg, base)[1][: e.max_prompts or None]
    out = evaluate.compare(str(r.sft), {m: str(r.root / m) for m in cfg.methods}, str(r.reward), convs,
                           e.true_rule or cfg.feedback.rule, e.max_new_tokens)
    r.evaluation.write_text(json.dumps(out, indent=2))


def _report(cfg, base, r, timings):
    from llmtrain.report import write_report

    write_report(r, cfg, timings, samples=answers_side_by_side(cfg, base, r))


# ----------------------------------------------------------------------------- checks and samples


def style_check(cfg, base: Path, models: dict[str, Path]) -> dict:
    """Greedy answers of each model to the held-out SFT prompts, checked for the target style."""
    from llmtrain.styles import is_aristocratic

    _, held_out = _held_out(cfg, base)
    convs = held_out[: cfg.style_eval_prompts or None]
    out = {"rule": "at least one marker phrase of llmtrain.styles.ARISTOCRAT_MARKERS",
           "prompts": [c[-1]["content"] for c in convs], "models": {}}
    for name, ckpt in models.items():
        answers = _answers(ckpt, convs, cfg.sft.sample_tokens)
        hits = sum(map(is_aristocratic, answers))
        out["models"][name] = {"hits": hits, "n": len(answers), "rate": hits / max(1, len(answers)), "answers": answers}
    return out


def _answers(ckpt: Path, convs: list, max_new: int) -> list[str]:
    from llmtrain import checkpoint
    from llmtrain.generate import greedy_answers
    from llmtrain.model import Transformer
    from llmtrain.tokenizer import Tokenizer, render_chat

    tok = Tokenizer.load(checkpoint.tokenizer_of(ckpt))
    model = Transformer(checkpoint.model_config(ckpt))
    checkpoint.load_weights(ckpt, model)
    # As SFT's sample answers: a prompt too long is cut from the left.
    prompts = [render_chat(tok, c, add_generation_prompt=True)[0] for c in convs]
    return [text for text, _ in greedy_answers(model, tok, prompts, max_new)]


def answers_side_by_side(cfg, base: Path, r: Run) -> list[dict]:
    _, held_out = _held_out(cfg, base)
    convs = held_out[: cfg.sample_prompts]
    models = {"pretrained": r.pretrain, "SFT": r.sft, **{m.upper(): r.root / m for m in cfg.methods}}
    answers = {name: _answers(ckpt, convs, cfg.sft.sample_tokens) for name, ckpt in models.items()}
    return [{"prompt": c[-1]["content"], **{name: answers[name][i] for name in models}} for i, c in enumerate(convs)]


def _finished(run_dir: Path, max_steps: int) -> bool:
    from llmtrain import checkpoint

    steps = checkpoint.step_dirs(run_dir)
    return bool(steps) and checkpoint.read_meta(steps[-1])["step"] >= max_steps


def load(path: str | Path | None, overrides: list[str]) -> PipelineConfig:
    return load_config(PipelineConfig, path, overrides)
