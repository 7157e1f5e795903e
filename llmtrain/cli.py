"""`llmtrain <command> [-c cfg.yaml] [key=value ...]`: a table {command: function}.

Errors the user can fix (config, data, checkpoints) print as one line and exit with status 2.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from llmtrain.errors import LlmtrainError


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--config", help="YAML config file (see configs/)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="override config fields, e.g. optim.lr=3e-4")


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
    from llmtrain.generate import SamplingConfig, generate
    from llmtrain.model import Transformer
    from llmtrain.tokenizer import Tokenizer

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
    outs = generate(model, [[tok.bos_id, *tok.encode(p)] for p in prompts], sampling, pad_id=tok.pad_id, generator=gen)
    for p, o in zip(prompts, outs):
        print(p + tok.decode(o, skip_special=True))
        if len(prompts) > 1:
            print("---")
    return 0


COMMANDS = {
    "tokenizer": (cmd_tokenizer, "train a byte-level BPE tokenizer on text/JSONL files", True),
    "prepare": (cmd_prepare, "tokenize a corpus into train/val token shards", True),
    "pretrain": (cmd_pretrain, "stage 1: pretrain the model by next-token prediction", True),
    "generate": (cmd_generate, "sample text from a checkpoint", False),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmtrain", description="Train a language model: pretraining, fine-tuning, RLHF.")
    sub = parser.add_subparsers(dest="command", metavar="command")
    for name, (_, help_, takes_config) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        if takes_config:
            _config_args(p)
    g = sub.choices["generate"]
    g.add_argument("checkpoint", help="a checkpoint folder, or a run directory (its latest checkpoint)")
    g.add_argument("--prompt", action="append", default=[], help="prompt text (repeat for a batch)")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.8)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=0.95)
    g.add_argument("--greedy", action="store_true", help="always take the most likely token")
    g.add_argument("--stop", action="append", default=[], help="extra stop token (a special token string)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="auto")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
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
