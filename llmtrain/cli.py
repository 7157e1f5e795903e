"""`llmtrain <command> [-c cfg.yaml] [key=value ...]`: a table {command: function}.

Errors the user can fix (config, data, checkpoints) print as one line and exit with status 2.

Each command imports what it runs inside its function (lazily): `llmtrain --help`, a bad flag
or a feedback command answers in a tenth of a second instead of first loading torch (about 2 s).
Nothing imports this module, so no import cycle can hide behind that (tests/unit/test_layers.py).
"""
from __future__ import annotations

import argparse
import json
import math
import sqlite3
import sys
from pathlib import Path

from llmtrain.data.jsonl import has_surrogate, read_jsonl
from llmtrain.errors import ConfigError, LlmtrainError


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--config", help="YAML config file (see configs/)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="override config fields, e.g. optim.lr=3e-4")


def _check_flags(**flags) -> None:
    """Command-line flags against the rules their config fields follow (llmtrain.config):
    `_check_flags(**{"--top-p": (value, TOP_P)})`; a one-line ConfigError naming the flag."""
    from llmtrain.config import COMMAND_LINE

    for name, (value, rule) in flags.items():
        if value is None:
            continue
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{COMMAND_LINE}: {name} must be a finite number, got {value}")
        problem = rule.problem(value)
        if problem:
            raise ConfigError(f"{COMMAND_LINE}: {name} {problem}, got {value!r}")


def _sampling_flags(args) -> None:
    from llmtrain.config import DEVICE, NON_NEGATIVE, POSITIVE, SEED, TEMPERATURE, TOP_P

    _check_flags(**{"--temperature": (args.temperature, TEMPERATURE), "--top-p": (args.top_p, TOP_P),
                    "--top-k": (args.top_k, NON_NEGATIVE), "--max-new-tokens": (args.max_new_tokens, POSITIVE),
                    "--seed": (args.seed, SEED), "--device": (args.device, DEVICE)})


def _check_db(path: str, must_exist: bool) -> None:
    """--db: an SQLite database (or, when it may be created, a writable new path)."""
    from llmtrain.config import path_problem

    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"--db {p}: is a directory, not a feedback database")
    if p.is_file():
        with open(p, "rb") as fh:
            head = fh.read(16)
        if head and head != b"SQLite format 3\x00":
            raise ConfigError(f"--db {p}: not an SQLite database (not a feedback database written by llmtrain)")
        return
    if must_exist:
        raise ConfigError(f"--db {p}: no such database (`llmtrain feedback generate` or `feedback add-annotator` creates one)")
    problem = path_problem(p, "file")
    if problem:
        raise ConfigError(f"--db {p}: {problem}")


def _check_out(flag: str, path: str | None, kind: str) -> None:
    from llmtrain.config import path_problem

    problem = path_problem(path, kind) if path else None
    if problem:
        raise ConfigError(f"{flag} {path}: {problem}")


def cmd_tokenizer(args) -> int:
    from llmtrain.config import TokenizerConfig, load_config
    from llmtrain.data.corpus import iter_documents
    from llmtrain.tokenizer import train_tokenizer

    cfg = load_config(TokenizerConfig, args.config, args.overrides)
    tok = train_tokenizer(iter_documents(cfg.inputs, cfg.jsonl_field), cfg.vocab_size, cfg.out,
                          cfg.min_frequency, cfg.max_chars)
    print(f"tokenizer: {tok.vocab_size} tokens -> {cfg.out}")
    return 0


def cmd_prepare(args) -> int:
    from llmtrain.config import PrepareConfig, load_config
    from llmtrain.data.pretrain import prepare

    cfg = load_config(PrepareConfig, args.config, args.overrides)
    meta = prepare(cfg.inputs, cfg.tokenizer, cfg.out_dir, cfg.jsonl_field, cfg.val_every, cfg.shard_tokens)
    s = meta["splits"]
    print(f"prepare: train {s['train']['tokens']:,} tokens ({s['train']['documents']:,} docs), "
          f"val {s['val']['tokens']:,} tokens ({s['val']['documents']:,} docs), {meta['dtype']} -> {cfg.out_dir}")
    return 0


def cmd_pretrain(args) -> int:
    from llmtrain.config import PretrainConfig, load_config
    from llmtrain.stages import pretrain

    pretrain.main(load_config(PretrainConfig, args.config, args.overrides))
    return 0


def cmd_generate(args) -> int:
    import torch

    from llmtrain import checkpoint, dist
    from llmtrain.generate import SamplingConfig, generate, prompt_budget, truncate_left
    from llmtrain.model import Transformer
    from llmtrain.tokenizer import Tokenizer

    _sampling_flags(args)
    ckpt = checkpoint.resolve(args.checkpoint)
    tok = Tokenizer.load(checkpoint.tokenizer_of(ckpt))
    model = Transformer(checkpoint.model_config(ckpt))
    checkpoint.load_weights(ckpt, model)
    model.to(dist.pick_device(args.device)).eval()
    stops = [tok.eos_id, tok.end_id] + [tok.tk.token_to_id(s) for s in args.stop if tok.tk.token_to_id(s) is not None]
    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=0.0 if args.greedy else args.temperature,
                              top_k=args.top_k, top_p=args.top_p, stop_ids=tuple(stops))
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(args.seed)
    prompts = args.prompt or [""]
    ids = [[tok.bos_id, *tok.encode(p)] for p in prompts]
    room = prompt_budget(model.config.max_seq_len, args.max_new_tokens)
    for i, p in enumerate(ids, 1):  # too long: cut from the left, said on stderr
        if len(p) > room:
            print(f"generate: prompt {i} has {len(p)} tokens; the model sees <|bos|> and its last {room - 1} (a prompt "
                  f"keeps {room} of the context window of {model.config.max_seq_len} tokens with --max-new-tokens "
                  f"{args.max_new_tokens})", file=sys.stderr)
    ids = [truncate_left(p, room) for p in ids]
    ctx = model.config.max_seq_len
    fits = ctx - max(len(p) for p in ids)
    if args.max_new_tokens > fits:  # generation stops at the end of the context window: say so up front
        print(f"generate: --max-new-tokens {args.max_new_tokens} does not fit: the context window of {ctx} tokens "
              f"leaves room for at most {fits} new tokens after the prompt"
              + ("s" if len(ids) > 1 else "") + ", so answers stop there", file=sys.stderr)
    outs = generate(model, ids, sampling, pad_id=tok.pad_id, generator=gen)
    for p, o in zip(prompts, outs):
        print(p + tok.decode(o, skip_special=True))
        if len(prompts) > 1:
            print("---")
    return 0


def cmd_sft(args) -> int:
    from llmtrain.config import SFTConfig, load_config
    from llmtrain.stages import sft

    sft.main(load_config(SFTConfig, args.config, args.overrides))
    return 0


def cmd_classify(args) -> int:
    from llmtrain.config import ClassifyConfig, load_config
    from llmtrain.stages import classify

    classify.main(load_config(ClassifyConfig, args.config, args.overrides))
    return 0


def cmd_classify_predict(argv: list[str]) -> int:
    from llmtrain.stages import classify

    p = argparse.ArgumentParser(prog="llmtrain classify predict", description="label new text with a classifier")
    p.add_argument("checkpoint")
    p.add_argument("--text", action="append", default=[], help="a text to label (repeatable)")
    p.add_argument("--input", help="JSONL file with a 'text' field per line")
    p.add_argument("-o", "--output", help="write JSONL predictions here instead of printing")
    p.add_argument("--device", default="auto")
    a = p.parse_args(argv)
    from llmtrain.config import DEVICE

    _check_flags(**{"--device": (a.device, DEVICE)})
    _check_out("--output", a.output, "file")
    texts = list(a.text)
    if a.input:
        def text_of(obj):
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                raise ValueError("'text' is missing or not a string")
            return obj["text"]
        texts += [t for _, t in read_jsonl(a.input, text_of)[0]]
    if not texts:
        p.error("give --text or --input")
    model, tok, labels = classify.load_classifier(a.checkpoint, a.device)
    preds = classify.predict(model, tok, labels, texts)
    lines = [json.dumps({"text": t, **r}) for t, r in zip(texts, preds)]
    if a.output:
        Path(a.output).write_text("\n".join(lines) + "\n")
        print(f"{len(lines)} predictions -> {a.output}")
    else:
        for t, r in zip(texts, preds):
            print(f"{r['label']}\t{r['probs'][r['label']]:.3f}\t{t}")
    return 0


def cmd_reward(args) -> int:
    from llmtrain.config import RewardConfig, load_config
    from llmtrain.stages import reward

    reward.main(load_config(RewardConfig, args.config, args.overrides))
    return 0


def cmd_reward_score(argv: list[str]) -> int:
    from llmtrain import scoring

    p = argparse.ArgumentParser(prog="llmtrain reward score", description="score answers with a reward model")
    p.add_argument("checkpoint")
    p.add_argument("--prompt", help="the prompt (with --response)")
    p.add_argument("--response", action="append", default=[], help="an answer to score (repeatable)")
    p.add_argument("--input", help='JSONL of {"prompt": ..., "response": ...} (or "messages" + "response")')
    p.add_argument("-o", "--output", help="write JSONL scores here instead of printing")
    p.add_argument("--raw", action="store_true", help="do not subtract the normalisation offset")
    a = p.parse_args(argv)
    _check_out("--output", a.output, "file")
    items = []
    if a.prompt is not None:
        if not a.response:
            p.error("--prompt needs at least one --response")
        items += [([{"role": "user", "content": a.prompt}], r) for r in a.response]
    if a.input:
        def parse(obj):
            if not isinstance(obj, dict) or not isinstance(obj.get("response"), str):
                raise ValueError("'response' is missing or not a string")
            if isinstance(obj.get("messages"), list):
                return obj["messages"], obj["response"]
            if isinstance(obj.get("prompt"), str):
                return [{"role": "user", "content": obj["prompt"]}], obj["response"]
            raise ValueError("'prompt' (or 'messages') is missing")
        items += [x for _, x in read_jsonl(a.input, parse)[0]]
    if not items:
        p.error("give --prompt and --response, or --input")
    model, tok, norm = scoring.load_reward_model(a.checkpoint)
    scores = scoring.score_texts(model, tok, items, offset=0.0 if a.raw else norm.get("offset", 0.0))
    if a.output:
        Path(a.output).write_text("".join(json.dumps({"messages": m, "response": r, "reward": s}) + "\n"
                                          for (m, r), s in zip(items, scores)))
        print(f"{len(scores)} scores -> {a.output}")
    else:
        for (m, r), s in zip(items, scores):
            print(f"{s:+.4f}\t{r}")
    return 0


def cmd_reward_chitchat(argv: list[str]) -> int:
    from llmtrain.data.chitchat import convert

    p = argparse.ArgumentParser(prog="llmtrain reward chitchat",
                                description="convert chitchat-dataset's human ratings to rankings.jsonl")
    p.add_argument("-o", "--output", default="chitchat_rankings.jsonl")
    p.add_argument("--k-max", type=int, default=4, help="chats per ranking at most (default 4)")
    p.add_argument("--max-chars", type=int, default=400, help="characters of each chat kept (default 400)")
    a = p.parse_args(argv)
    from llmtrain.config import POSITIVE, Rule

    _check_flags(**{"--k-max": (a.k_max, Rule(lambda v: 2 <= v <= 9, "between 2 and 9")),
                    "--max-chars": (a.max_chars, POSITIVE)})
    _check_out("--output", a.output, "file")
    r = convert(a.output, a.k_max, a.max_chars)
    print(f"chitchat: {r['rankings']} rankings of {r['chats']} rated chats over {r['prompts']} starter prompts -> "
          f"{a.output} (train with data.min_score_gap=3)")
    return 0


def rl_command(algorithm: str):
    """`llmtrain ppo|grpo|rloo`: the one RL stage (llmtrain/stages/ppo.py) with its algorithm set."""
    def cmd(args) -> int:
        from llmtrain.config import PPOConfig, load_config
        from llmtrain.stages import ppo

        cfg = load_config(PPOConfig, args.config, [f"algorithm={algorithm}", *args.overrides])
        if cfg.algorithm != algorithm:
            raise ConfigError(f"algorithm={cfg.algorithm} given to `llmtrain {algorithm}`; use `llmtrain {cfg.algorithm}`")
        ppo.main(cfg)
        return 0
    return cmd


def cmd_dpo(args) -> int:
    from llmtrain.config import DPOConfig, load_config
    from llmtrain.stages import dpo

    dpo.main(load_config(DPOConfig, args.config, args.overrides))
    return 0


def cmd_evaluate(args) -> int:
    from llmtrain.config import EvaluateConfig, load_config
    from llmtrain.stages import evaluate

    evaluate.main(load_config(EvaluateConfig, args.config, args.overrides))
    return 0


def cmd_chat(args) -> int:
    from llmtrain.chat import ChatSession, repl
    from llmtrain.generate import SamplingConfig

    _sampling_flags(args)
    s = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=0.0 if args.greedy else args.temperature,
                       top_k=args.top_k, top_p=args.top_p)
    session = ChatSession(args.checkpoint, s, system=args.system, device=args.device, seed=args.seed)
    if args.prompt:
        for p in args.prompt:
            print(session.reply(p))
        return 0
    repl(session)
    return 0


def cmd_feedback(args) -> int:
    from llmtrain.config import NON_NEGATIVE, Rule
    from llmtrain.feedback.store import StoreError

    # Flags and the database are checked before anything is read or written.
    # Only generate, add-annotator and serve may start a new database; the others need one
    # (a missing --db is an error, and no empty file is left behind).
    _check_db(args.db, must_exist=args.action in ("export", "simulate", "import", "rotate-token", "revoke-annotator"))
    if args.action == "generate":
        _sampling_flags(args)
        from llmtrain.config import POSITIVE

        _check_flags(**{"-k": (args.k, Rule(lambda v: 2 <= v <= 9, "between 2 and 9")),
                        "--rounds": (args.rounds, POSITIVE)})
    elif args.action == "serve":
        _check_flags(**{"--port": (args.port, Rule(lambda v: 0 <= v <= 65535, "a port number, 0 to 65535"))})
    elif args.action == "simulate":
        _check_flags(**{"--limit": (args.limit, NON_NEGATIVE | "0: all")})
    elif args.action == "export":
        _check_out("--output", args.output, "file")
    try:
        return FEEDBACK[args.action][0](args)
    except (StoreError, ValueError) as e:
        raise LlmtrainError(str(e)) from None
    except sqlite3.DatabaseError as e:  # a damaged file with an SQLite header, or one locked for good
        raise LlmtrainError(f"--db {args.db}: {e}") from None


def fb_generate(args) -> int:
    from llmtrain.feedback.candidates import generate_to_db
    from llmtrain.generate import SamplingConfig

    s = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                       top_p=args.top_p)
    r = generate_to_db(args.checkpoint, args.prompts, args.db, args.k, s, seed=args.seed, device=args.device,
                       rounds=args.rounds, key="--max-new-tokens")
    print(f"feedback generate: {r['prompts']} prompts x {args.k}" + (f" x {args.rounds} rounds" if args.rounds > 1 else "")
          + f" = {r['candidates']} candidates -> {args.db}")
    return 0


def fb_add_annotator(args) -> int:
    from llmtrain.feedback.store import FeedbackStore

    token = FeedbackStore(args.db).add_annotator(args.name, is_admin=args.admin)
    print(f"annotator {args.name}{' (admin)' if args.admin else ''} added; their secret token (shown once):")
    print(token)
    return 0


def fb_revoke_annotator(args) -> int:
    from llmtrain.feedback.store import FeedbackStore

    n = FeedbackStore(args.db).revoke_annotator(args.name)
    print(f"annotator {args.name} revoked: their token no longer works, {n} signed-in session(s) ended "
          f"(their rankings stay; `llmtrain feedback rotate-token {args.name}` re-admits them)")
    return 0


def fb_rotate_token(args) -> int:
    from llmtrain.feedback.store import FeedbackStore

    token = FeedbackStore(args.db).rotate_token(args.name)
    print(f"annotator {args.name}: new secret token (shown once; the old one and its sessions no longer work):")
    print(token)
    return 0


def fb_export(args) -> int:
    from llmtrain.feedback.export import export
    from llmtrain.feedback.store import FeedbackStore

    c = export(FeedbackStore(args.db), args.output, include_simulated=not args.people_only)
    print(f"feedback export: {c['exported']} rankings ({c['simulated']} simulated; {c['skipped']} skips left out) -> {args.output}")
    return 0


def fb_import(args) -> int:
    from llmtrain.feedback.export import import_rankings, read_import
    from llmtrain.feedback.store import FeedbackStore

    read_import(args.input)  # a bad file is reported before the database is opened
    r = import_rankings(FeedbackStore(args.db), args.input)
    print(f"feedback import: {r['read']} read, {r['added']} added, {r['already_there']} already there -> {args.db}")
    return 0


def fb_simulate(args) -> int:
    from llmtrain.feedback.simulate import simulate
    from llmtrain.feedback.store import FeedbackStore

    r = simulate(FeedbackStore(args.db), args.rule, args.name, args.limit)
    print(f"feedback simulate: {r['annotator']} (simulated) ranked {r['ranked']} prompts "
          f"({r['all_equal']} with all candidates tied)")
    return 0


def fb_serve(args) -> int:
    from llmtrain.feedback.app import serve

    serve(args.db, host=args.host, port=args.port)
    return 0


FEEDBACK = {
    "generate": (fb_generate, "write K sampled answers per prompt into the feedback database"),
    "add-annotator": (fb_add_annotator, "add an annotator and print their secret token"),
    "revoke-annotator": (fb_revoke_annotator, "disable an annotator: their token and signed-in sessions stop working"),
    "rotate-token": (fb_rotate_token, "give an annotator a new token; the old one and its sessions stop working"),
    "serve": (fb_serve, "start the ranking web app"),
    "simulate": (fb_simulate, "rank pending prompts by a scripted rule (demo and tests only)"),
    "export": (fb_export, "write rankings.jsonl for the reward model and DPO"),
    "import": (fb_import, "load rankings.jsonl made elsewhere into the database"),
}


def cmd_import(args) -> int:
    from llmtrain.config import NON_NEGATIVE
    from llmtrain.interop.hf import import_hf, summary_line

    _check_flags(**{"--max-seq-len": (args.max_seq_len, NON_NEGATIVE | "0: the model's own")})
    _check_out("--output", args.output, "directory")
    print(summary_line(import_hf(args.source, args.output, max_seq_len=args.max_seq_len)))
    return 0


def cmd_export(args) -> int:
    from llmtrain.interop.hf import export_hf, export_line

    _check_out("--output", args.output, "directory")
    print(export_line(export_hf(args.checkpoint, args.output, dtype=args.dtype, adapter=args.adapter, base=args.base)))
    return 0


def cmd_pipeline(args) -> int:
    from llmtrain import pipeline

    if not args.config:
        raise LlmtrainError("give the pipeline's YAML with -c (configs/demo.yaml is the demo's)")
    pipeline.run(pipeline.load(args.config, args.overrides), base=Path.cwd(), from_stage=args.from_stage, human=args.human)
    return 0


def cmd_demo(args) -> int:
    from llmtrain import pipeline

    pipeline.run(pipeline.load(pipeline.DEMO_CONFIG, args.overrides), from_stage=args.from_stage, human=args.human)
    return 0


COMMANDS = {
    "tokenizer": (cmd_tokenizer, "train a byte-level BPE tokenizer on text/JSONL files", True),
    "prepare": (cmd_prepare, "tokenize a corpus into train/val token shards", True),
    "pretrain": (cmd_pretrain, "stage 1: pretrain the model by next-token prediction", True),
    "generate": (cmd_generate, "sample text from a checkpoint", False),
    "sft": (cmd_sft, "stage 2: fine-tune on instruction/response pairs (loss on responses)", True),
    "classify": (cmd_classify, "fine-tune with a classification head; `classify predict CKPT` labels text", True),
    "reward": (cmd_reward, "stage 3a: reward model on rankings; `reward score CKPT`, `reward chitchat`", True),
    "ppo": (rl_command("ppo"), "stage 3b: RLHF with PPO against the reward model (KL-held, freezing or LoRA)", True),
    "grpo": (rl_command("grpo"), "stage 3b: critic-free RLHF, GRPO (G answers per prompt, no value model)", True),
    "rloo": (rl_command("rloo"), "stage 3b: critic-free RLHF, RLOO (leave-one-out baseline, no value model)", True),
    "dpo": (cmd_dpo, "stage 3c: Direct Preference Optimization from the rankings (no reward model)", True),
    "evaluate": (cmd_evaluate, "compare two checkpoints: reward-model score, win rates (a=... b=...)", True),
    "chat": (cmd_chat, "chat with a fine-tuned checkpoint in the terminal", False),
    "feedback": (cmd_feedback, "human feedback: candidates, the ranking app, simulated annotator, export", False),
    "import": (cmd_import, "read a local Hugging Face model folder (Llama, Mistral, Qwen2) into a checkpoint", False),
    "export": (cmd_export, "write a checkpoint as a Hugging Face model folder (transformers; LoRA as a peft adapter)", False),
    "pipeline": (cmd_pipeline, "run a chain of stages from one YAML (-c)", True),
    "demo": (cmd_demo, "the whole chain on shipped data, on CPU, in minutes (configs/demo.yaml)", False),
}


SUB_ACTIONS = {
    ("classify", "predict"): cmd_classify_predict,
    ("reward", "score"): cmd_reward_score,
    ("reward", "chitchat"): cmd_reward_chitchat,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmtrain", description="Train a language model: pretraining, fine-tuning, RLHF.")
    sub = parser.add_subparsers(dest="command", metavar="command")
    for name, (_, help_, takes_config) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        if takes_config:
            _config_args(p)
    fb = sub.choices["feedback"].add_subparsers(dest="action", metavar="action", required=True)
    for name, (_, help_) in FEEDBACK.items():
        a = fb.add_parser(name, help=help_, description=help_)
        a.add_argument("--db", default="feedback.db", help="the feedback SQLite database (default feedback.db)")
    g = fb.choices["generate"]
    g.add_argument("checkpoint", help="the fine-tuned checkpoint that writes the candidates")
    g.add_argument("--prompts", required=True, help="JSONL of {\"prompt\": ...} or {\"messages\": [...]}")
    g.add_argument("-k", type=int, default=4, help="candidates per prompt, 2 to 9 (default 4)")
    g.add_argument("--rounds", type=int, default=1,
                   help="answer every prompt this many times, K fresh candidates each, ranked separately (default 1)")
    g.add_argument("--max-new-tokens", type=int, default=48)
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=0.95)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="auto")
    fb.choices["add-annotator"].add_argument("name")
    fb.choices["add-annotator"].add_argument("--admin", action="store_true", help="may see everyone's progress and agreement")
    fb.choices["revoke-annotator"].add_argument("name")
    fb.choices["rotate-token"].add_argument("name")
    fb.choices["serve"].add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    fb.choices["serve"].add_argument("--port", type=int, default=8000)
    fb.choices["simulate"].add_argument("--rule", required=True, help="aristocrat | length | relevance (see feedback/simulate.py)")
    fb.choices["simulate"].add_argument("--name", default="", help="the simulated annotator's name (default sim-RULE)")
    fb.choices["simulate"].add_argument("--limit", type=int, default=0, help="rank at most this many prompts (0: all)")
    fb.choices["export"].add_argument("-o", "--output", default="rankings.jsonl")
    fb.choices["export"].add_argument("--people-only", action="store_true", help="leave simulated rankings out")
    fb.choices["import"].add_argument("input", help="a rankings.jsonl in the export format")
    sub.choices["demo"].add_argument("overrides", nargs="*", metavar="key=value",
                                     help="override fields of configs/demo.yaml, e.g. pretrain.run.max_steps=50")
    for name in ("demo", "pipeline"):
        sub.choices[name].add_argument("--from", dest="from_stage", default="", metavar="STAGE",
                                       help="rerun from this stage on: tokenizer, prepare, pretrain, sft, candidates, "
                                            "rankings, reward, ppo, grpo, rloo, dpo, evaluate, report")
        sub.choices[name].add_argument("--human", action="store_true",
                                       help="people rank the candidates in the web app instead of the simulated annotator")
    for name in ("generate", "chat"):
        g = sub.choices[name]
        g.add_argument("checkpoint", help="a checkpoint folder, or a run directory (its latest checkpoint)")
        g.add_argument("--prompt", action="append", default=[],
                       help="prompt text (repeat for a batch)" if name == "generate" else "answer this and exit (repeatable)")
        g.add_argument("--max-new-tokens", type=int, default=64)
        g.add_argument("--temperature", type=float, default=0.8)
        g.add_argument("--top-k", type=int, default=0)
        g.add_argument("--top-p", type=float, default=0.95)
        g.add_argument("--greedy", action="store_true", help="always take the most likely token")
        g.add_argument("--seed", type=int, default=0)
        g.add_argument("--device", default="auto")
    imp = sub.choices["import"]
    imp.add_argument("source", help="a local Hugging Face model folder: config.json, *.safetensors, tokenizer.json")
    imp.add_argument("-o", "--output", required=True, help="the run directory to write (its checkpoints/step_0000000)")
    imp.add_argument("--max-seq-len", type=int, default=0,
                     help="use a shorter context than max_position_embeddings (0: the model's own)")
    exp = sub.choices["export"]
    exp.add_argument("checkpoint", help="a checkpoint folder, or a run directory (its latest checkpoint)")
    exp.add_argument("-o", "--output", required=True, help="the folder to write (must not exist or be empty)")
    exp.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                     help="weights' dtype (auto: an untouched import's own, else float32)")
    exp.add_argument("--adapter", action="store_true",
                     help="PPO with LoRA: write the adapter for peft (and the starting policy in OUTPUT/base)")
    exp.add_argument("--base", default="",
                     help="with --adapter: the base model's name or path, if already exported (no OUTPUT/base then)")
    sub.choices["generate"].add_argument("--stop", action="append", default=[], help="extra stop token (a special token string)")
    sub.choices["chat"].add_argument("--system", default="", help="a system message that opens the conversation")
    return parser


def _not_utf8(argv: list[str]) -> str | None:
    """The flag or key whose value (or which itself) holds bytes that are not UTF-8: Python hands
    them over as lone surrogates, which no tokenizer, file or terminal takes. None when all are text."""
    for i, arg in enumerate(argv):
        if not has_surrogate(arg):
            continue
        if arg.startswith("-"):
            name = arg.split("=", 1)[0]
            return name if not has_surrogate(name) else "an option's name"
        key, sep, _ = arg.partition("=")
        if sep and not has_surrogate(key):
            return f"'{key.strip()}'"
        if i > 0 and argv[i - 1].startswith("-") and not has_surrogate(argv[i - 1]):
            return argv[i - 1]
        return f"argument {i + 1}"
    return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    bad = _not_utf8(argv)
    if bad is not None:
        cmd = " ".join(argv[:2]) if tuple(argv[:2]) in SUB_ACTIONS else argv[0] if argv[0] in COMMANDS else ""
        print(f"llmtrain{' ' + cmd if cmd else ''}: error: command line: {bad} is not UTF-8 text "
              f"(give the value in UTF-8)", file=sys.stderr)
        return 2
    parser = build_parser()
    sub_action = SUB_ACTIONS.get(tuple(argv[:2]))
    if sub_action is not None:  # e.g. `classify predict`: a sub-command with its own flags
        try:
            return sub_action(argv[2:])
        except LlmtrainError as e:
            print(f"llmtrain {' '.join(argv[:2])}: error: {e}", file=sys.stderr)
            return 2
    # key=value overrides may come before or after options (`demo --from ppo ppo.kl.beta=0.1`):
    # argparse fills the positional list only once, so collect the rest here.
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides") or any("=" not in e or e.startswith("-") for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    if not args.command:
        parser.print_help()
        return 0
    try:
        return COMMANDS[args.command][0](args)
    except LlmtrainError as e:
        print(f"llmtrain {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
