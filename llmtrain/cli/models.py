"""The commands that use a trained checkpoint: `generate`, `chat`, `classify predict` (label text),
`reward score` (score answers), and `import` / `export` (Hugging Face model folders).

Each command imports what it runs inside its function (lazily): a model loads torch (about 2 s),
and `llmtrain --help` or a bad flag does not wait for it.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from llmtrain.cli.args import check_flags, check_out, sampling_flags
from llmtrain.files import write_file


def add_arguments(commands: dict[str, argparse.ArgumentParser]) -> None:
    """The flags of generate, chat, import and export, on their parsers in `commands`."""
    for name in ("generate", "chat"):
        g = commands[name]
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
    commands["generate"].add_argument("--stop", action="append", default=[], help="extra stop token (a special token string)")
    commands["chat"].add_argument("--system", default="", help="a system message that opens the conversation")
    imp = commands["import"]
    imp.add_argument("source", help="a Hugging Face model folder (config.json, *.safetensors, tokenizer.json) or a "
                     "Hub id org/name[@revision] (fetched through huggingface_hub: its cache, HF_TOKEN, HF_HUB_OFFLINE)")
    imp.add_argument("-o", "--output", required=True, help="the run directory to write (its checkpoints/step_0000000)")
    imp.add_argument("--max-seq-len", type=int, default=0,
                     help="use a shorter context than max_position_embeddings (0: the model's own)")
    exp = commands["export"]
    exp.add_argument("checkpoint", help="a checkpoint folder, or a run directory (its latest checkpoint)")
    exp.add_argument("-o", "--output", required=True, help="the folder to write (must not exist or be empty)")
    exp.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                     help="weights' dtype (auto: an untouched import's own, else float32)")
    exp.add_argument("--adapter", action="store_true",
                     help="PPO with LoRA: write the adapter for peft (and the starting policy in OUTPUT/base)")
    exp.add_argument("--base", default="",
                     help="with --adapter: the base model's name or path, if already exported (no OUTPUT/base then)")


def cmd_generate(args) -> int:
    import torch

    from llmtrain import checkpoint, dist
    from llmtrain.generate import SamplingConfig, generate, prompt_budget, truncate_left
    from llmtrain.tokenizer import Tokenizer

    sampling_flags(args)
    ckpt = checkpoint.resolve(args.checkpoint)
    tok = Tokenizer.load(checkpoint.tokenizer_of(ckpt))
    model = checkpoint.load_transformer(ckpt)
    model.to(dist.pick_device(args.device)).eval()
    stops = [*tok.stop_ids] + [tok.tk.token_to_id(s) for s in args.stop if tok.tk.token_to_id(s) is not None]
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


def cmd_chat(args) -> int:
    from llmtrain.chat import ChatSession, repl
    from llmtrain.generate import SamplingConfig

    sampling_flags(args)
    s = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=0.0 if args.greedy else args.temperature,
                       top_k=args.top_k, top_p=args.top_p)
    session = ChatSession(args.checkpoint, s, system=args.system, device=args.device, seed=args.seed)
    if args.prompt:
        for p in args.prompt:
            print(session.reply(p))
        return 0
    repl(session)
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

    check_flags(**{"--device": (a.device, DEVICE)})
    check_out("--output", a.output, "file")
    texts = list(a.text)
    if a.input:
        from llmtrain.data.sources import read_records

        def text_of(obj):
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                raise ValueError("'text' is missing or not a string")
            return obj["text"]
        texts += [t for _, t in read_records(a.input, text_of)[0]]
    if not texts:
        p.error("give --text or --input")
    model, tok, labels = classify.load_classifier(a.checkpoint, a.device)
    preds = classify.predict(model, tok, labels, texts)
    lines = [json.dumps({"text": t, **r}) for t, r in zip(texts, preds)]
    if a.output:
        write_file(a.output, "\n".join(lines) + "\n")
        print(f"{len(lines)} predictions -> {a.output}")
    else:
        for t, r in zip(texts, preds):
            print(f"{r['label']}\t{r['probs'][r['label']]:.3f}\t{t}")
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
    check_out("--output", a.output, "file")
    items = []
    if a.prompt is not None:
        if not a.response:
            p.error("--prompt needs at least one --response")
        items += [([{"role": "user", "content": a.prompt}], r) for r in a.response]
    if a.input:
        from llmtrain.data.sources import read_records

        def parse(obj):
            if not isinstance(obj, dict) or not isinstance(obj.get("response"), str):
                raise ValueError("'response' is missing or not a string")
            if isinstance(obj.get("messages"), list):
                return obj["messages"], obj["response"]
            if isinstance(obj.get("prompt"), str):
                return [{"role": "user", "content": obj["prompt"]}], obj["response"]
            raise ValueError("'prompt' (or 'messages') is missing")
        items += [x for _, x in read_records(a.input, parse)[0]]
    if not items:
        p.error("give --prompt and --response, or --input")
    model, tok, norm = scoring.load_reward_model(a.checkpoint)
    scores = scoring.score_texts(model, tok, items, offset=0.0 if a.raw else norm.get("offset", 0.0))
    if a.output:
        write_file(a.output, "".join(json.dumps({"messages": m, "response": r, "reward": s}) + "\n"
                                    for (m, r), s in zip(items, scores)))
        print(f"{len(scores)} scores -> {a.output}")
    else:
        for (m, r), s in zip(items, scores):
            print(f"{s:+.4f}\t{r}")
    return 0


def cmd_import(args) -> int:
    from llmtrain.config import NON_NEGATIVE
    from llmtrain.interop.hf import import_hf, summary_line
    from llmtrain.interop.hub import download, parse_hub_id

    check_flags(**{"--max-seq-len": (args.max_seq_len, NON_NEGATIVE | "0: the model's own")})
    check_out("--output", args.output, "directory")
    source = args.source
    if not Path(source).exists() and parse_hub_id(source):  # a Hub id: fetched into the HF cache first
        source = download(source)
    print(summary_line(import_hf(source, args.output, max_seq_len=args.max_seq_len)))
    return 0


def cmd_export(args) -> int:
    from llmtrain.interop.hf import export_hf, export_line

    check_out("--output", args.output, "directory")
    print(export_line(export_hf(args.checkpoint, args.output, dtype=args.dtype, adapter=args.adapter, base=args.base)))
    return 0
