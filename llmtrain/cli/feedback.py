"""`llmtrain feedback <action>`: the human-feedback commands around one SQLite database (--db).
FEEDBACK below lists the actions: write candidate answers, manage annotators, serve the ranking
app, rank by a scripted rule, export and import rankings; and the blind arena: every model's
answer to held-out prompts, votes by a scripted rule, the votes exported as rankings of two.

Each action imports what it runs inside its function (lazily): only `generate` and
`arena-generate` load torch, and the others answer in a tenth of a second.
"""
from __future__ import annotations

import argparse
import sqlite3

from llmtrain.cli.args import check_db, check_flags, check_out, sampling_flags
from llmtrain.errors import LlmtrainError


def add_arguments(feedback: argparse.ArgumentParser) -> None:
    """The actions of `llmtrain feedback`, each with its flags, on the parser `feedback`."""
    fb = feedback.add_subparsers(dest="action", metavar="action", required=True)
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
    fb.choices["serve"].add_argument("--model", action="append", default=[], metavar="NAME=CKPT",
                                     help="also serve a chat page (/chat) with this checkpoint, labelled NAME "
                                          "(repeatable; the models run in a worker process of their own); the arena's "
                                          "models served under their arena names answer people's own arena prompts")
    fb.choices["serve"].add_argument("--chat-jobs", type=int, default=4,
                                     help="chat answers running or waiting at once; more are refused with 503 (default 4)")
    fb.choices["simulate"].add_argument("--rule", required=True, help="aristocrat | length | relevance (see feedback/simulate.py)")
    fb.choices["simulate"].add_argument("--name", default="", help="the simulated annotator's name (default sim-RULE)")
    fb.choices["simulate"].add_argument("--limit", type=int, default=0, help="rank at most this many prompts (0: all)")
    fb.choices["export"].add_argument("-o", "--output", default="rankings.jsonl")
    fb.choices["export"].add_argument("--people-only", action="store_true", help="leave simulated rankings out")
    fb.choices["import"].add_argument("input", help="a rankings.jsonl in the export format")
    arena_arguments(fb)


def arena_arguments(fb) -> None:
    ag = fb.choices["arena-generate"]
    ag.add_argument("--model", action="append", default=[], metavar="NAME=CKPT", required=True,
                    help="a model of the arena: its name (shown after a vote) and checkpoint; twice or more")
    ag.add_argument("--prompts", required=True, help="JSONL of held-out {\"prompt\": ...} or {\"messages\": [...]}")
    ag.add_argument("--val-every", type=int, default=0,
                    help="hold out every N-th prompt of --prompts, as evaluate's val_every (default 0: all of them)")
    ag.add_argument("--max-prompts", type=int, default=0, help="at most this many held-out prompts (0: all)")
    ag.add_argument("--max-new-tokens", type=int, default=48)
    ag.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy, as evaluate; > 0: sample")
    ag.add_argument("--top-k", type=int, default=0, help="when sampling (0: no top-k filter)")
    ag.add_argument("--top-p", type=float, default=1.0, help="when sampling (1: no nucleus filter)")
    ag.add_argument("--seed", type=int, default=0, help="when sampling: each model's generator starts from it")
    ag.add_argument("--device", default="auto")
    fb.choices["arena-simulate"].add_argument("--rule", required=True, help="a rule of llmtrain/styles.py RULES")
    fb.choices["arena-simulate"].add_argument("--name", default="", help="the simulated voter's name (default sim-RULE)")
    fb.choices["arena-simulate"].add_argument("--limit", type=int, default=0, help="vote on at most this many matches (0: all)")
    fb.choices["arena-export"].add_argument("-o", "--output", default="arena.jsonl")
    fb.choices["arena-export"].add_argument("--people-only", action="store_true", help="leave simulated votes out")


def cmd_feedback(args) -> int:
    from llmtrain.config import NON_NEGATIVE, Rule
    from llmtrain.feedback.store import StoreError

    # Flags and the database are checked before anything is read or written.
    # Only generate, add-annotator and serve may start a new database; the others need one
    # (a missing --db is an error, and no empty file is left behind).
    check_db(args.db, must_exist=args.action in ("export", "simulate", "import", "rotate-token", "revoke-annotator",
                                                 "arena-simulate", "arena-export"))
    if args.action == "arena-generate":
        arena_flags(args)
    elif args.action == "generate":
        sampling_flags(args)
        from llmtrain.config import POSITIVE

        check_flags(**{"-k": (args.k, Rule(lambda v: 2 <= v <= 9, "between 2 and 9")),
                       "--rounds": (args.rounds, POSITIVE)})
    elif args.action == "serve":
        from llmtrain.feedback.modelserver import parse_models

        check_flags(**{"--port": (args.port, Rule(lambda v: 0 <= v <= 65535, "a port number, 0 to 65535")),
                       "--chat-jobs": (args.chat_jobs, Rule(lambda v: 1 <= v <= 64, "between 1 and 64"))})
        args.models = parse_models(args.model)
    elif args.action in ("simulate", "arena-simulate"):
        check_flags(**{"--limit": (args.limit, NON_NEGATIVE | "0: all")})
    elif args.action in ("export", "arena-export"):
        check_out("--output", args.output, "file")
    try:
        return FEEDBACK[args.action][0](args)
    except (StoreError, ValueError) as e:
        raise LlmtrainError(str(e)) from None
    except sqlite3.DatabaseError as e:  # a damaged file with an SQLite header, or one locked for good
        raise LlmtrainError(f"--db {args.db}: {e}") from None


def arena_flags(args) -> None:
    """arena-generate's flags, checked before any model loads."""
    from llmtrain.config import NON_NEGATIVE, Rule
    from llmtrain.feedback.arena_answers import parse_models

    sampling_flags(args)
    check_flags(**{"--val-every": (args.val_every, Rule(lambda v: v == 0 or v >= 2, "0 (all) or >= 2")),
                   "--max-prompts": (args.max_prompts, NON_NEGATIVE | "0: all")})
    args.models = parse_models(args.model)


def fb_arena_generate(args) -> int:
    from llmtrain.feedback.arena_answers import generate_arena
    from llmtrain.generate import SamplingConfig

    s = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                       top_p=args.top_p)
    r = generate_arena(args.models, args.prompts, args.db, s, seed=args.seed, device=args.device,
                       val_every=args.val_every, max_prompts=args.max_prompts)
    print(f"feedback arena-generate: {r['models']} models x {r['prompts']} held-out prompts ({r['decoding']} answers)"
          f" = {r['matches']} matches -> {args.db}")
    return 0


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
    """export, arena-export: rankings (or the arena's votes as rankings of two) -> a JSONL file."""
    from llmtrain.feedback.export import export, export_arena
    from llmtrain.feedback.store import FeedbackStore

    with FeedbackStore(args.db) as store:
        if args.action == "arena-export":
            c = export_arena(store, args.output, include_simulated=not args.people_only)
            what = (f"{c['votes']} votes ({c['simulated']} simulated): {c['preferences']} preferences, {c['ties']} ties, "
                    f"{c['both_bad']} both bad (no pair)")
        else:
            c = export(store, args.output, include_simulated=not args.people_only)
            what = f"{c['exported']} rankings ({c['simulated']} simulated; {c['skipped']} skips left out)"
    print(f"feedback {args.action}: {what} -> {args.output}")
    return 0


def fb_import(args) -> int:
    from llmtrain.feedback.export import import_rankings, read_import
    from llmtrain.feedback.store import FeedbackStore

    read_import(args.input)  # a bad file is reported before the database is opened
    r = import_rankings(FeedbackStore(args.db), args.input)
    print(f"feedback import: {r['read']} read, {r['added']} added, {r['already_there']} already there -> {args.db}")
    return 0


def fb_simulate(args) -> int:
    """simulate, arena-simulate: a simulated annotator ranks prompts (votes on matches) by a rule."""
    from llmtrain.feedback.simulate import arena_simulate, simulate
    from llmtrain.feedback.store import FeedbackStore

    with FeedbackStore(args.db) as store:
        if args.action == "arena-simulate":
            r = arena_simulate(store, args.rule, args.name, args.limit)
            what = f"voted on {r['voted']} matches ({r['a']} A, {r['b']} B, {r['tie']} ties)"
        else:
            r = simulate(store, args.rule, args.name, args.limit)
            what = f"ranked {r['ranked']} prompts ({r['all_equal']} with all candidates tied)"
    print(f"feedback {args.action}: {r['annotator']} (simulated) {what}")
    return 0


def fb_serve(args) -> int:
    from llmtrain.feedback.app import serve

    serve(args.db, host=args.host, port=args.port, models=args.models, chat_jobs=args.chat_jobs)
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
    "arena-generate": (fb_arena_generate, "the blind arena: every model answers every held-out prompt"),
    "arena-simulate": (fb_simulate, "vote on the arena's matches by a scripted rule (demo and tests only)"),
    "arena-export": (fb_export, "write the arena's votes as rankings of two answers for the reward model and DPO"),
}
