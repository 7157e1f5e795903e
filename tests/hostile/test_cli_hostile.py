"""Hostile input to the CLI: bad configs, data files, checkpoints and generation options.

Every case runs `llmtrain.cli.main(argv)` in-process from a fresh working directory and asserts:
exit status 2; stderr is one line (plus argparse's usage for a malformed flag) naming the key,
flag or file at fault; no "Traceback"; and nothing written (the working directory and the shared
fixture files are unchanged, so no out_dir, database or temp folder is left). A few cases run the
real entry point (`python -m llmtrain`) in a subprocess.

The valid rest of each command line points at tiny fixtures (a 512-token tokenizer, a 2-layer
checkpoint, a few JSONL lines) and a run of one or two steps, so a bad value that slipped
through would finish quickly and be seen as exit status 0.

`LLMTRAIN_HOSTILE_REPORT=path` appends each case's outcome (clear / traceback / accepted /
unclear) as a JSON line there: the table of the issue's closing note is counted from it.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, WORDS, write_jsonl

DEEP = "[" * 100_000 + "]" * 100_000  # Python's json recurses until RecursionError on this


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def reward_ckpt(tmp_path_factory, pretrained) -> Path:
    """A reward model trained for one step: enough for PPO to accept it as one."""
    from llmtrain.config import OptimConfig, RewardConfig, RewardDataConfig, RunConfig
    from llmtrain.stages import reward

    d = tmp_path_factory.mktemp("hostile-rm")
    data = write_jsonl(d / "r.jsonl", [{"prompt": f"Say {w} {i}", "ranked": [{"text": f"Indeed, {w}.", "rank": 1},
                                                                               {"text": "no", "rank": 2}]}
                                       for i, w in zip(range(24), WORDS * 2)])
    reward.main(RewardConfig(init_from=str(pretrained), data=RewardDataConfig(train=str(data), val_every=3),
                             optim=OptimConfig(lr=1e-3, warmup_steps=0), norm_prompts=2, norm_samples=1,
                             norm_max_new_tokens=2,
                             run=RunConfig(out_dir=str(d / "rm"), max_steps=1, batch_size=2, eval_every=0, threads=1)))
    return d / "rm"


@pytest.fixture(scope="module")
def fx(tmp_path_factory, pretrained, reward_ckpt, tokenizer_path, shards, corpus_file) -> dict:
    """Paths of good and bad input files, by name, for the {placeholders} of the cases."""
    d = tmp_path_factory.mktemp("hostile-fx")
    pairs = [{"prompt": f"Tell me about the {w} {i}", "response": f"Indeed, the {w} is splendid."}
             for i, w in zip(range(40), WORDS * 2)]
    write_jsonl(d / "sft.jsonl", pairs)
    write_jsonl(d / "prompts.jsonl", [{"prompt": p["prompt"]} for p in pairs])
    write_jsonl(d / "classify.jsonl", [{"text": p["prompt"], "label": "ab"[i % 2]} for i, p in enumerate(pairs)])
    write_jsonl(d / "rankings.jsonl", [{"prompt": p["prompt"], "ranked": [{"text": "Indeed, old chap.", "rank": 1},
                                                                          {"text": "ok", "rank": 2}]} for p in pairs])
    files = {
        "bad_utf8.jsonl": b'{"prompt": "\xff\xfe", "response": "c"}\n{"prompt": "a", "response": "b"}\n',
        "bad_utf8.txt": b"good words here\n\nand then \xc3\x28 broken\n",
        "binary.jsonl": bytes(range(256)) * 8,
        "deep.jsonl": DEEP.encode() + b"\n",
        "deep_obj.jsonl": ('{"prompt": ' * 50_000 + '"x"' + "}" * 50_000 + "\n").encode(),
        "list.jsonl": b"[1, 2, 3]\n",
        "number.jsonl": b"42\n",
        "string.jsonl": b'"just a string"\n',
        "null.jsonl": b"null\n",
        "malformed.jsonl": b'{"prompt": "a", "response": \n',
        "empty.jsonl": b"",
        "blank.jsonl": b"\n   \n\n",
        "prompt_int.jsonl": b'{"prompt": 1, "response": "x"}\n',
        "messages_str.jsonl": b'{"messages": "hi"}\n',
        "bad_role.jsonl": b'{"messages": [{"role": "bot", "content": "x"}]}\n',
        "content_int.jsonl": b'{"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "y"}]}\n',
        "no_assistant.jsonl": b'{"messages": [{"role": "user", "content": "hi"}]}\n',
        "text_int.jsonl": b'{"text": 7}\n',
        "label_list.jsonl": b'{"text": "hi", "label": [1]}\n',
        "ranked_str.jsonl": b'{"prompt": "p", "ranked": "a > b"}\n',
        "rank_zero.jsonl": b'{"prompt": "p", "ranked": [{"text": "a", "rank": 0}, {"text": "b", "rank": 1}]}\n',
        "rank_order.jsonl": b'{"prompt": "p", "ranked": [{"text": "a", "rank": 2}, {"text": "b", "rank": 1}]}\n',
        "one_candidate.jsonl": b'{"prompt": "p", "ranked": [{"text": "a", "rank": 1}]}\n',
        "score_str.jsonl": b'{"prompt": "p", "ranked": [{"text": "a", "rank": 1, "score": "high"}, {"text": "b", "rank": 2}]}\n',
        "response_missing.jsonl": b'{"prompt": "p"}\n',
        "notes.csv": b"a,b\n1,2\n",
        "text.db": b"this is a text file, not SQLite\n",
        "binary.yaml": bytes(range(256)) * 4,
        "nonutf8.yaml": b"run:\n  out_dir: \xff\xfe\n",
        "list.yaml": b"- a\n- b\n",
        "scalar.yaml": b"hello\n",
        "broken.yaml": b"run: [1\n",
        "deep.yaml": DEEP.encode(),
        "tab.yaml": b"run:\n\tmax_steps: 3\n",
        "not_json_tok.json": b"not a tokenizer\n",
        "binary_tok.json": bytes(range(256)) * 4,
        # Lone surrogates: valid JSON escapes that are not text (the tokenizer raised TypeError on them).
        "surr_sft.jsonl": b'{"prompt": "a", "response": "b"}\n{"prompt": "\\ud800", "response": "x"}\n',
        "surr_msgs.jsonl": b'{"messages": [{"role": "user", "content": "hi \\udfff"}, {"role": "assistant", "content": "y"}]}\n',
        "surr_response.jsonl": b'{"prompt": "p", "response": "ok \\uDC80"}\n',
        "surr_classify.jsonl": b'{"text": "\\ud800", "label": "a"}\n',
        "surr_prompts.jsonl": b'{"prompt": "\\udc80 x"}\n',
        "surr_rank.jsonl": b'{"prompt": "p", "ranked": [{"text": "a", "rank": 1}, {"text": "\\ud83d", "rank": 2}]}\n',
        "surr_key.jsonl": b'{"prompt": "p", "response": "r", "\\ud800": 1}\n',
        "surr_text.jsonl": b'{"text": "fine"}\n{"text": "\\ud800"}\n',
        # Both prompt/response and messages on one line.
        "both.jsonl": b'{"prompt": "a", "response": "b", "messages": [{"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]}\n',
        "both_prompt.jsonl": b'{"prompt": "a", "messages": [{"role": "user", "content": "c"}]}\n',
        # YAML: a key given twice (last would win), an alias bomb, a blank out_dir, warm-up past the end.
        "dup.yaml": b"optim:\n  lr: 0.01\n  lr: -1\n",
        "dup_section.yaml": b"run:\n  max_steps: 1\nmodel:\n  dim: 32\nrun:\n  max_steps: 2\n",
        "bomb.yaml": b"a: &a [x, x, x, x, x, x, x, x, x, x]\n" + b"".join(  # 10**8 values once expanded
            b"%c: &%c [%s]\n" % (c, c, b", ".join([b"*%c" % p] * 10)) for p, c in zip(b"abcdefg", b"bcdefgh"))
            + b"run: *h\n",
        "blank_out.yaml": b"run:\n  out_dir: '   '\n",
        "warmup.yaml": b"optim:\n  warmup_steps: 50\nrun:\n  max_steps: 1\n",
    }
    for name, data in files.items():
        (d / name).write_bytes(data)
    for name, text in {"lr_neg": "optim:\n  lr: -0.001\n", "lr_nan": "optim:\n  lr: .nan\n",
                       "beta1": "optim:\n  beta1: 1.5\n", "batch0": "run:\n  batch_size: 0\n",
                       "heads0": "model:\n  n_heads: 0\n", "unknown": "optim:\n  lrr: 0.1\n",
                       "run_list": "run: [1, 2]\n", "device": "run:\n  device: cuda:3\n",
                       "log0": "run:\n  log_every: 0\n", "accum0": "run:\n  grad_accum: 0\n",
                       "kv3": "model:\n  n_kv_heads: 3\n", "dim_heads": "model:\n  dim: 30\n  n_heads: 4\n",
                       "ppo_topp": "top_p: 1.5\n", "ppo_temp": "temperature: -0.5\n", "dpo_beta": "beta: -1\n",
                       "minibatch": "minibatch: 0\n", "wd": "optim:\n  weight_decay: -0.1\n",
                       "eps": "optim:\n  eps: 0\n", "sft_val": "data:\n  val_every: 0\n", "ok_lr": "optim:\n  lr: 0.01\n"}.items():
        (d / f"{name}.yaml").write_text(text)
    (d / "adir").mkdir()
    (d / "empty_dir").mkdir()
    from llmtrain.feedback.store import FeedbackStore  # an existing, empty feedback database (import needs one)

    FeedbackStore(d / "fb_empty.db").close()
    # Token-shard folders with a damaged meta.json.
    for name, meta in {"meta_empty": b"{}", "meta_binary": bytes(range(256)), "meta_deep": DEEP.encode(),
                       "meta_list": b"[]", "meta_nodtype": None}.items():
        sd = d / name
        shutil.copytree(shards, sd)
        if meta is None:
            m = json.loads((sd / "meta.json").read_text())
            del m["dtype"]
            meta = json.dumps(m).encode()
        (sd / "meta.json").write_bytes(meta)
    # Checkpoints with a damaged config.json, and a folder that is not a checkpoint.
    from llmtrain import checkpoint

    src = checkpoint.resolve(pretrained)
    for name, conf in {"ckpt_conf_binary": bytes(range(256)), "ckpt_conf_empty": b"{}",
                       "ckpt_conf_heads": None}.items():
        cd = d / name
        shutil.copytree(src, cd)
        if conf is None:
            c = json.loads((cd / "config.json").read_text())
            c["model"]["n_heads"] = 0
            conf = json.dumps(c).encode()
        (cd / "config.json").write_bytes(conf)
    weights = d / "ckpt_bad_weights"
    shutil.copytree(src, weights)
    (weights / "model.safetensors").write_bytes(b"\x00" * 64)
    # A Hugging Face folder whose config.json is not JSON.
    (d / "hf_bad").mkdir()
    (d / "hf_bad" / "config.json").write_bytes(b"\xff\xfe not json")
    paths = {name: str(d / name) for name in [*files, "adir", "empty_dir", "fb_empty.db", "sft.jsonl", "prompts.jsonl",
                                                "classify.jsonl", "rankings.jsonl", "ckpt_bad_weights", "hf_bad"]}
    paths.update({f"{n}.yaml": str(d / f"{n}.yaml") for n in ["lr_neg", "lr_nan", "beta1", "batch0", "heads0",
                                                               "unknown", "run_list", "device", "log0", "accum0",
                                                               "kv3", "dim_heads", "ppo_topp", "ppo_temp",
                                                               "dpo_beta", "minibatch", "wd", "eps", "sft_val",
                                                               "ok_lr"]})
    paths.update({n: str(d / n) for n in ["meta_empty", "meta_binary", "meta_deep", "meta_list", "meta_nodtype",
                                         "ckpt_conf_binary", "ckpt_conf_empty", "ckpt_conf_heads"]})
    paths.update(ckpt=str(pretrained), rm=str(reward_ckpt), tok=str(tokenizer_path), shards=str(shards), corpus=str(corpus_file),
                 missing=str(d / "no_such_file.jsonl"), missing_dir=str(d / "no_such_dir"), fxdir=str(d))
    return paths


# ----------------------------------------------------------------------------- the cases

OUT = "{work}/out"
BASE = {
    "tokenizer": ["tokenizer", "inputs=[{corpus}]", "out=" + OUT + "/tok.json", "vocab_size=300"],
    "prepare": ["prepare", "inputs=[{corpus}]", "tokenizer={tok}", "out_dir=" + OUT],
    "pretrain": ["pretrain", "data.shards={shards}", "run.out_dir=" + OUT, "model.dim=32", "model.n_layers=1",
                 "model.max_seq_len=32", "run.max_steps=2", "run.batch_size=2", "run.eval_batches=1", "run.threads=1"],
    "sft": ["sft", "init_from={ckpt}", "data.train={sft.jsonl}", "run.out_dir=" + OUT, "run.max_steps=1",
            "run.batch_size=2", "sample_prompts=0", "run.threads=1"],
    "classify": ["classify", "init_from={ckpt}", "data.train={classify.jsonl}", "run.out_dir=" + OUT,
                 "run.max_steps=1", "run.batch_size=2", "run.threads=1"],
    "reward": ["reward", "init_from={ckpt}", "data.train={rankings.jsonl}", "run.out_dir=" + OUT, "run.max_steps=1",
               "run.batch_size=2", "norm_prompts=0", "run.threads=1"],
    "ppo": ["ppo", "policy={ckpt}", "reward_model={rm}", "prompts={prompts.jsonl}", "run.out_dir=" + OUT,
            "run.max_steps=1", "rollout_batch=2", "minibatch=2", "max_new_tokens=2", "eval_prompts=1", "run.threads=1"],
    "grpo": ["grpo", "policy={ckpt}", "reward_model={rm}", "prompts={prompts.jsonl}", "run.out_dir=" + OUT,
             "run.max_steps=1", "rollout_batch=2", "group_size=2", "minibatch=2", "max_new_tokens=2", "eval_prompts=1",
             "run.threads=1"],
    "dpo": ["dpo", "policy={ckpt}", "data.train={rankings.jsonl}", "run.out_dir=" + OUT, "run.max_steps=1",
            "run.batch_size=2", "run.threads=1"],
    "evaluate": ["evaluate", "a={ckpt}", "b={ckpt}", "reward_model={rm}", "prompts={prompts.jsonl}",
                 "out=" + OUT + "/eval.json", "max_prompts=2", "max_new_tokens=2"],
    "generate": ["generate", "{ckpt}", "--prompt", "hi", "--max-new-tokens", "2"],
    "chat": ["chat", "{ckpt}", "--prompt", "hi", "--max-new-tokens", "2"],
    "fbgen": ["feedback", "generate", "{ckpt}", "--prompts", "{prompts.jsonl}", "--db", "{work}/fb.db", "-k", "2",
              "--max-new-tokens", "2"],
    # The demo would run the whole chain if a bad value slipped through; `--from nothing` is a
    # second error it reports only after loading the config, so the value's error must come first.
    "demo": ["demo", "run_dir=" + OUT, "--from", "nothing"],
}

CASES: list = []  # (id, argv template, [needles], argparse?)


def case(cid: str, argv: list[str], *needles: str, argparse: bool = False) -> None:
    CASES.append(pytest.param(argv, list(needles), argparse, id=cid))


def at(name: str, where: str) -> list[str]:
    """Needles for a file: its path followed by ':LINE: ...' or ': ...', or the path and a phrase."""
    return ["{%s}%s" % (name, where)] if where.startswith(":") else ["{%s}" % name, where]


def bad_value(cmd: str, override: str, key: str | None = None) -> None:
    """One bad key=value on the command line: the error names the key and the command line."""
    key = key or override.split("=", 1)[0]
    case(f"{cmd}:{override}", [*BASE[cmd], override], f"'{key}'", "command line")


def bad_flag(cmd: str, flag: str, value: str, needle: str | None = None) -> None:
    case(f"{cmd}:{flag}={value}", [*BASE[cmd], flag, value], needle or flag)


# --- config values given on the command line (each names the dotted key and "command line")
for o in ["run.batch_size=0", "run.batch_size=-3", "run.max_steps=-1", "run.grad_accum=0", "run.log_every=0",
          "run.eval_every=-1", "run.eval_batches=0", "run.save_every=-2", "run.keep_last=-1", "run.seed=-1",
          "run.threads=-1", "run.device=cuda:3", "run.device=tpu", "run.device=cuda:x", "run.precision=fp16",
          "run.resume=maybe", "run.out_dir=/proc/llmtrain-out", "run.out_dir={corpus}",
          "run.out_dir={corpus}/sub", "optim.lr=0", "optim.lr=-1e-3", "optim.lr=nan", "optim.lr=inf",
          "optim.lr=.inf", "optim.lr=abc", "optim.beta1=1.5", "optim.beta1=1", "optim.beta1=-0.1", "optim.beta2=1.0",
          "optim.eps=0", "optim.eps=-1e-8", "optim.weight_decay=-0.1", "optim.warmup_steps=-1",
          "optim.min_lr_ratio=2", "optim.grad_clip=-1", "optim.schedule=linear", "model.n_heads=0",
          "model.n_layers=0", "model.dim=0", "model.dim=-32", "model.max_seq_len=0", "model.n_kv_heads=3",
          "model.n_heads=5", "model.n_kv_heads=8", "model.vocab_size=-1", "model.rope_theta=0", "model.norm_eps=0",
          "model.ffn_dim=-1", "model.init_std=nan", "optim.lr.x=1", "run=3", "model=[1]"]:
    key = {"optim.lr.x=1": "optim.lr", "run=3": "run", "model=[1]": "model"}.get(o)
    bad_value("pretrain", o, key)
bad_value("pretrain", "model.dim=30", "model.n_heads")  # 30 is not divisible by 4 heads
bad_value("pretrain", "optim.lrr=0.1", "optim.lrr")
bad_value("pretrain", "runn.max_steps=1", "runn")
case("pretrain:override-no-equals", [*BASE["pretrain"], "=5"], "'=5'", "key=value")
case("pretrain:override-bad-yaml", [*BASE["pretrain"], "optim.lr=[1"], "'optim.lr'", "not valid YAML")

for o in ["data.val_every=0", "data.val_every=1", "data.max_len=-1", "sample_prompts=-1", "sample_tokens=0",
          "freeze.first_layers=-1", "run.batch_size=0", "optim.lr=nan", "optim.beta2=1.5", "run.grad_accum=0",
          "run.device=cuda", "run.out_dir=/proc/x"]:
    bad_value("sft", o)
for o in ["data.val_every=0", "data.max_len=-5", "run.batch_size=0", "optim.lr=-1", "run.log_every=0"]:
    bad_value("classify", o)
for o in ["data.val_every=0", "data.min_score_gap=-1", "margin_scale=-1", "norm_prompts=-1", "norm_samples=0",
          "norm_max_new_tokens=0", "optim.weight_decay=-1", "run.eval_every=-5"]:
    bad_value("reward", o)
for o in ["rollout_batch=0", "minibatch=0", "minibatch=3", "ppo_epochs=0", "temperature=-1", "temperature=nan",
          "top_p=0", "top_p=1.5", "top_k=-1", "max_new_tokens=0", "clip=0", "gamma=1.5", "lam=-0.1",
          "kl.beta=-1", "kl.target=0", "kl.horizon=0", "ptx_coef=-1", "ptx_coef=0.5", "val_every=0",
          "eval_prompts=-1", "lora.r=0", "lora.dropout=1", "optim.lr=inf", "kl.estimator=k2"]:
    key = {"ptx_coef=0.5": "ptx_shards"}.get(o)
    bad_value("ppo", o, key)
for o in ["group_size=1", "group_size=0", "temperature=-0.1", "top_p=2"]:
    bad_value("grpo", o)
for o in ["beta=-1", "beta=0", "beta=nan", "optim.lr=inf", "data.val_every=1", "lora.alpha=0", "run.batch_size=0"]:
    bad_value("dpo", o)
for o in ["max_new_tokens=0", "val_every=0", "max_prompts=-1", "out={corpus}/x.json", "out={adir}"]:
    bad_value("evaluate", o)
for o in ["vocab_size=0", "min_frequency=0", "max_chars=-1", "out=/proc/tok.json", "out={adir}"]:
    bad_value("tokenizer", o)
for o in ["val_every=1", "shard_tokens=0", "shard_tokens=-5", "out_dir=/proc/data", "out_dir={corpus}"]:
    bad_value("prepare", o)
# The demo: keys are named as typed under `llmtrain demo` (the stage's section first).
for o in ["ppo.optim.lr=-1", "pretrain.run.batch_size=0", "sft.data.val_every=0", "dpo.beta=-1",
          "reward.data.val_every=1", "grpo.group_size=1", "feedback.k=1", "feedback.temperature=-1",
          "feedback.top_p=0", "feedback.port=70000", "pretrain.model.n_heads=0", "ppo.run.device=cuda",
          "pretrain.optim.beta1=1.5", "rloo.minibatch=0", "run_dir=/proc/demo", "sample_prompts=-1"]:
    bad_value("demo", o)

# --- config values from a YAML file (each names the key and the file)
for name, cmd, key in [("lr_neg", "pretrain", "optim.lr"), ("lr_nan", "pretrain", "optim.lr"),
                       ("beta1", "pretrain", "optim.beta1"), ("batch0", "pretrain", "run.batch_size"),
                       ("heads0", "pretrain", "model.n_heads"), ("unknown", "pretrain", "optim.lrr"),
                       ("run_list", "pretrain", "run"), ("device", "pretrain", "run.device"),
                       ("log0", "sft", "run.log_every"), ("accum0", "sft", "run.grad_accum"),
                       ("kv3", "pretrain", "model.n_kv_heads"), ("dim_heads", "pretrain", "model.n_heads"),
                       ("ppo_topp", "ppo", "top_p"), ("ppo_temp", "ppo", "temperature"), ("dpo_beta", "dpo", "beta"),
                       ("minibatch", "ppo", "minibatch"), ("wd", "reward", "optim.weight_decay"),
                       ("eps", "classify", "optim.eps"), ("sft_val", "sft", "data.val_every")]:
    drop = {"dim_heads": ("model.dim", "model.n_heads"), "run_list": ("run.",)}.get(name, (key,))
    rest = [a for a in BASE[cmd][1:] if not a.split("=", 1)[0].startswith(drop)]
    case(f"{cmd}:yaml:{name}", [BASE[cmd][0], "-c", "{%s.yaml}" % name, *rest], f"'{key}'", f"{name}.yaml")
# The value came from the command line although a YAML file was given: blamed on the command line.
case("pretrain:yaml+cli", ["pretrain", "-c", "{ok_lr.yaml}", *BASE["pretrain"][1:], "optim.lr=-2"], "'optim.lr'",
     "command line")

# --- broken YAML files
for name, needle in [("binary.yaml", "not UTF-8"), ("nonutf8.yaml", "not UTF-8"), ("list.yaml", "top level"),
                     ("scalar.yaml", "top level"), ("broken.yaml", "not valid YAML"), ("deep.yaml", "nested"),
                     ("tab.yaml", "not valid YAML"), ("missing", "not found"), ("adir", "directory")]:
    for cmd in ("pretrain", "sft") if name in ("binary.yaml", "deep.yaml", "list.yaml") else ("pretrain",):
        case(f"{cmd}:-c {name}", [cmd, "-c", "{%s}" % name], "{%s}" % name, needle)
case("demo:pipeline -c binary", ["pipeline", "-c", "{binary.yaml}"], "{binary.yaml}", "not UTF-8")

# --- data files (each names the file; the line where there is one)
for name, where in [("bad_utf8.jsonl", ":1: not UTF-8"), ("binary.jsonl", ":1"), ("deep.jsonl", ":1: JSON nested"),
                    ("deep_obj.jsonl", ":1: JSON nested"), ("list.jsonl", ":1: not a JSON object"),
                    ("number.jsonl", ":1"), ("string.jsonl", ":1"), ("null.jsonl", ":1"),
                    ("malformed.jsonl", ":1: malformed JSON"), ("empty.jsonl", ": no usable lines"),
                    ("blank.jsonl", ": no usable lines"), ("prompt_int.jsonl", ":1: 'prompt'"),
                    ("messages_str.jsonl", ":1: 'messages'"), ("bad_role.jsonl", ":1: messages[0].role"),
                    ("content_int.jsonl", ":1: messages[0].content"), ("no_assistant.jsonl", ":1: no assistant"),
                    ("adir", ": is a directory"), ("missing", "not found")]:
    case(f"sft:data {name}", [*BASE["sft"], "data.train={%s}" % name], *at(name, where))
for name, where in [("bad_utf8.jsonl", ":1: not UTF-8"), ("deep.jsonl", ":1: JSON nested"),
                    ("text_int.jsonl", ":1"), ("label_list.jsonl", ":1: 'label'"), ("adir", ": is a directory")]:
    case(f"classify:data {name}", [*BASE["classify"], "data.train={%s}" % name], *at(name, where))
for name, where in [("bad_utf8.jsonl", ":1: not UTF-8"), ("deep.jsonl", ":1: JSON nested"),
                    ("ranked_str.jsonl", ":1: 'ranked'"), ("rank_zero.jsonl", ":1: ranked[0].rank"),
                    ("rank_order.jsonl", ":1: 'ranked' must be listed best first"),
                    ("one_candidate.jsonl", ":1: 'ranked'"), ("score_str.jsonl", ":1: ranked[0].score"),
                    ("empty.jsonl", ": no usable lines")]:
    case(f"reward:data {name}", [*BASE["reward"], "data.train={%s}" % name], *at(name, where))
for name, where in [("deep_obj.jsonl", ":1: JSON nested"), ("bad_utf8.jsonl", ":1: not UTF-8")]:
    case(f"dpo:data {name}", [*BASE["dpo"], "data.train={%s}" % name], *at(name, where))
for name, where in [("bad_utf8.jsonl", ":1: not UTF-8"), ("deep.jsonl", ":1: JSON nested"),
                    ("number.jsonl", ":1"), ("adir", ": is a directory")]:
    case(f"ppo:prompts {name}", [*BASE["ppo"], "prompts={%s}" % name], *at(name, where))
case("evaluate:prompts deep", [*BASE["evaluate"], "prompts={deep.jsonl}"], "{deep.jsonl}:1: JSON nested")
for name, where in [("bad_utf8.jsonl", ":1: not UTF-8"), ("bad_utf8.txt", ": not UTF-8"),
                    ("deep.jsonl", ":1: JSON nested"), ("text_int.jsonl", ":1: field 'text'"),
                    ("list.jsonl", ":1: no field"), ("notes.csv", "unsupported file type"),
                    ("empty_dir", "no .txt"), ("missing", "not found")]:
    case(f"tokenizer:inputs {name}", [*BASE["tokenizer"], "inputs=[{%s}]" % name], *at(name, where))
for name, where in [("bad_utf8.txt", ": not UTF-8"), ("deep.jsonl", ":1: JSON nested")]:
    case(f"prepare:inputs {name}", [*BASE["prepare"], "inputs=[{%s}]" % name], *at(name, where))
for name, needle in [("missing", "not found"), ("not_json_tok.json", "not a valid tokenizer"),
                     ("binary_tok.json", "not a valid tokenizer")]:
    case(f"prepare:tokenizer {name}", [*BASE["prepare"], "tokenizer={%s}" % name], "{%s}" % name, needle)
for name in ["meta_empty", "meta_binary", "meta_deep", "meta_list", "meta_nodtype"]:
    case(f"pretrain:shards {name}", [*BASE["pretrain"], "data.shards={%s}" % name], "{%s}/meta.json" % name)
case("pretrain:shards missing", [*BASE["pretrain"], "data.shards={missing_dir}"], "{missing_dir}")
case("pretrain:shards a file", [*BASE["pretrain"], "data.shards={corpus}"], "{corpus}", "not a directory")

# --- checkpoints
for cmd, key in [("sft", "init_from"), ("classify", "init_from"), ("reward", "init_from"), ("dpo", "policy"),
                 ("ppo", "policy")]:
    case(f"{cmd}:{key} missing", [*BASE[cmd], f"{key}={{missing_dir}}"], "{missing_dir}", "not found")
case("sft:init_from a data file", [*BASE["sft"], "init_from={sft.jsonl}"], "{sft.jsonl}", "not a checkpoint")
case("sft:init_from bad weights", [*BASE["sft"], "init_from={ckpt_bad_weights}"], "{ckpt_bad_weights}/model.safetensors")
for cmd in ("generate", "chat"):
    case(f"{cmd}:checkpoint missing", [cmd, "{missing_dir}", "--prompt", "hi"], "{missing_dir}", "not found")
    case(f"{cmd}:checkpoint empty dir", [cmd, "{empty_dir}", "--prompt", "hi"], "{empty_dir}", "not a checkpoint")
    case(f"{cmd}:config.json binary", [cmd, "{ckpt_conf_binary}", "--prompt", "hi"], "{ckpt_conf_binary}/config.json")
    case(f"{cmd}:config.json empty", [cmd, "{ckpt_conf_empty}", "--prompt", "hi"], "{ckpt_conf_empty}/config.json")
case("generate:config.json heads 0", ["generate", "{ckpt_conf_heads}", "--prompt", "hi"],
     "{ckpt_conf_heads}/config.json", "'model.n_heads'")
case("generate:bad weights", ["generate", "{ckpt_bad_weights}", "--prompt", "hi"], "{ckpt_bad_weights}/model.safetensors")

# --- generation options
for cmd in ("generate", "chat", "fbgen"):
    for flag, value in [("--temperature", "-1"), ("--temperature", "nan"), ("--temperature", "inf"),
                        ("--top-p", "0"), ("--top-p", "1.5"), ("--top-p", "nan"), ("--top-k", "-1"),
                        ("--max-new-tokens", "0"), ("--device", "cuda"), ("--device", "cuda:3"),
                        ("--device", "quantum")]:
        bad_flag(cmd, flag, value)
for cmd in ("generate", "chat"):
    case(f"{cmd}:--temperature abc", [*BASE[cmd], "--temperature", "abc"], "--temperature", argparse=True)
    case(f"{cmd}:--top-k 1.5", [*BASE[cmd], "--top-k", "1.5"], "--top-k", argparse=True)
bad_flag("fbgen", "-k", "1")
bad_flag("fbgen", "-k", "10")
bad_flag("fbgen", "--rounds", "0")
for name, where in [("deep.jsonl", ":1: JSON nested"), ("bad_utf8.jsonl", ":1: not UTF-8"), ("missing", "not found")]:
    case(f"fbgen:--prompts {name}", ["feedback", "generate", "{ckpt}", "--prompts", "{%s}" % name, "--db",
                                    "{work}/fb.db", "-k", "2"], *at(name, where))

# --- the feedback database and its other commands
for action, extra in [("generate", ["{ckpt}", "--prompts", "{prompts.jsonl}"]), ("add-annotator", ["alice"]),
                      ("export", []), ("simulate", ["--rule", "length"]), ("import", ["{rankings.jsonl}"]),
                      ("serve", []), ("arena-generate", ["--model", "a={ckpt}", "--model", "b={ckpt}", "--prompts",
                                                         "{prompts.jsonl}"]),
                      ("arena-simulate", ["--rule", "length"]), ("arena-export", [])]:
    case(f"feedback {action}:--db text", ["feedback", action, *extra, "--db", "{text.db}"], "{text.db}", "not an SQLite")
    case(f"feedback {action}:--db dir", ["feedback", action, *extra, "--db", "{adir}"], "{adir}", "directory")
for action, extra in [("export", []), ("simulate", ["--rule", "length"]), ("arena-export", []),
                      ("arena-simulate", ["--rule", "length"])]:
    case(f"feedback {action}:--db missing", ["feedback", action, *extra, "--db", "{work}/none.db"], "none.db",
         "no such database")
case("feedback add-annotator:--db /proc", ["feedback", "add-annotator", "bob", "--db", "/proc/x.db"], "/proc/x.db")
case("feedback serve:--port 70000", ["feedback", "serve", "--db", "{work}/fb.db", "--port", "70000"], "--port")
case("feedback serve:--port -1", ["feedback", "serve", "--db", "{work}/fb.db", "--port", "-1"], "--port")
# The chat models of `feedback serve --model NAME=CKPT`: a malformed value, a bad or repeated name and a
# missing path are refused before anything starts; a path that is no loadable checkpoint is refused by
# the model worker as it loads it, still before anything is served or written (--port 0: any free port).
SERVE = ["feedback", "serve", "--db", "{work}/fb.db", "--port", "0"]
for value, needle in [("{ckpt}", "give NAME=CHECKPOINT"), ("={ckpt}", "give NAME=CHECKPOINT"),
                      ("tiny=", "give NAME=CHECKPOINT"), ("tiny={missing_dir}", "checkpoint not found"),
                      ("bad name={ckpt}", "model names are 1-64 ASCII letters, digits, '-', '_' or '.' (got 'bad name')"),
                      ("x" * 65 + "={ckpt}", "model names are 1-64"), ("a/b={ckpt}", "(got 'a/b')"),
                      ("tiny={adir}", "not a checkpoint"), ("tiny={ckpt_bad_weights}", "model.safetensors")]:
    case(f"feedback serve:--model {value}", [*SERVE, "--model", value], f"--model {value}", needle)
case("feedback serve:--model twice", [*SERVE, "--model", "a={ckpt}", "--model", "a={missing_dir}"], "--model a={missing_dir}",
     "the name a is given twice")
case("feedback serve:--chat-jobs 0", [*SERVE, "--model", "a={ckpt}", "--chat-jobs", "0"], "--chat-jobs")
for name, where in [("deep.jsonl", ":1: JSON nested"), ("bad_utf8.jsonl", ":1: not UTF-8"),
                    ("rank_zero.jsonl", ":1: ranked[0].rank")]:
    case(f"feedback import:{name}", ["feedback", "import", "{%s}" % name, "--db", "{fb_empty.db}"], *at(name, where))

# --- classify predict, reward score, import, export
for name, where in [("deep.jsonl", ":1: JSON nested"), ("bad_utf8.jsonl", ":1: not UTF-8"),
                    ("number.jsonl", ":1"), ("missing", "not found")]:
    case(f"classify predict:--input {name}", ["classify", "predict", "{ckpt}", "--input", "{%s}" % name],
         *at(name, where))
    case(f"reward score:--input {name}", ["reward", "score", "{ckpt}", "--input", "{%s}" % name],
         *at(name, where))
case("classify predict:--device cuda", ["classify", "predict", "{ckpt}", "--text", "hi", "--device", "cuda"], "--device")
case("classify predict:-o /proc", ["classify", "predict", "{ckpt}", "--text", "hi", "-o", "/proc/p.jsonl"], "/proc/p.jsonl")
case("reward score:-o dir", ["reward", "score", "{ckpt}", "--prompt", "p", "--response", "r", "-o", "{adir}"], "{adir}")
case("reward chitchat:--k-max 1", ["reward", "chitchat", "--k-max", "1", "-o", "{work}/c.jsonl"], "--k-max")
case("import:source missing", ["import", "{missing_dir}", "-o", OUT], "{missing_dir}")
case("import:source a file", ["import", "{corpus}", "-o", OUT], "{corpus}")
case("import:config.json not JSON", ["import", "{hf_bad}", "-o", OUT], "{hf_bad}/config.json")
case("import:--max-seq-len -1", ["import", "{hf_bad}", "-o", OUT, "--max-seq-len", "-1"], "--max-seq-len")
case("import:-o under a file", ["import", "{hf_bad}", "-o", "{corpus}/out"], "{corpus}/out")
case("export:checkpoint missing", ["export", "{missing_dir}", "-o", OUT], "{missing_dir}")
case("export:-o a file", ["export", "{ckpt}", "-o", "{corpus}"], "{corpus}")


# --- found by the adversarial review of #15 (each failed before its fix)
# Lone surrogates in a data line: the file, the line and the field.
for cmd, key, name, where in [
        ("sft", "data.train", "surr_sft.jsonl", ":2: field 'prompt'"),
        ("sft", "data.train", "surr_msgs.jsonl", ":1: field 'messages[0].content'"),
        ("sft", "data.train", "surr_response.jsonl", ":1: field 'response'"),
        ("sft", "data.train", "surr_key.jsonl", ":1: a key"),
        ("classify", "data.train", "surr_classify.jsonl", ":1: field 'text'"),
        ("reward", "data.train", "surr_rank.jsonl", ":1: field 'ranked[1].text'"),
        ("dpo", "data.train", "surr_rank.jsonl", ":1: field 'ranked[1].text'"),
        ("ppo", "prompts", "surr_prompts.jsonl", ":1: field 'prompt'"),
        ("evaluate", "prompts", "surr_prompts.jsonl", ":1: field 'prompt'")]:
    case(f"{cmd}:{key} {name}", [*BASE[cmd], f"{key}={{{name}}}"], *at(name, where))
case("fbgen:--prompts surr_prompts.jsonl", [*BASE["fbgen"][:4], "{surr_prompts.jsonl}", *BASE["fbgen"][5:]],
     "{surr_prompts.jsonl}:1: field 'prompt'")
case("tokenizer:inputs surr_text.jsonl", [*BASE["tokenizer"], "inputs=[{surr_text.jsonl}]"],
     "{surr_text.jsonl}:2: field 'text'")
case("prepare:inputs surr_text.jsonl", [*BASE["prepare"], "inputs=[{surr_text.jsonl}]"],
     "{surr_text.jsonl}:2: field 'text'")
case("classify predict:--input surr_classify.jsonl", ["classify", "predict", "{ckpt}", "--input", "{surr_classify.jsonl}"],
     "{surr_classify.jsonl}:1: field 'text'")
case("reward score:--input surr_response.jsonl", ["reward", "score", "{ckpt}", "--input", "{surr_response.jsonl}"],
     "{surr_response.jsonl}:1: field 'response'")
# Bytes that are not UTF-8 on the command line (Python passes them as lone surrogates).
for cmd, argv, needle in [("generate", ["generate", "{ckpt}", "--prompt", "hi \udcff"], "--prompt"),
                          ("chat", ["chat", "{ckpt}", "--prompt", "\udcc3("], "--prompt"),
                          ("chat", ["chat", "{ckpt}", "--prompt", "hi", "--system", "\udcff"], "--system"),
                          ("generate", ["generate", "{ckpt}", "--prompt=\udcff"], "--prompt"),
                          ("pretrain", [*BASE["pretrain"], "run.out_dir={work}/\udcff"], "'run.out_dir'"),
                          ("sft", [*BASE["sft"], "data.train={work}/\udcfe.jsonl"], "'data.train'"),
                          ("pretrain", ["pretrain", "-c", "{work}/\udcff.yaml"], "-c"),
                          ("fbgen", [*BASE["fbgen"][:4], "{work}/\udcff.jsonl", *BASE["fbgen"][5:]], "--prompts"),
                          ("classify predict", ["classify", "predict", "{ckpt}", "--text", "\udcff"], "--text")]:
    case(f"{cmd}:argv not UTF-8 {len(CASES)}", argv, needle, "not UTF-8")
# Seeds that do not fit 64 bits; threads beyond any machine; blank output paths.
for o in ["run.seed=18446744073709551617", "run.seed=9223372036854775808", "run.threads=100000"]:
    bad_value("pretrain", o)
for o in ["run.seed=18446744073709551617", "run.threads=100000", "run.out_dir=", "run.out_dir= "]:
    bad_value("sft", o)
bad_value("pretrain", "run.out_dir=")
bad_value("prepare", "out_dir=")
bad_value("tokenizer", "out=")
bad_value("dpo", "run.seed=99999999999999999999")
for cmd in ("generate", "chat", "fbgen"):
    bad_flag(cmd, "--seed", "18446744073709551617")
    bad_flag(cmd, "--seed", "-1")
case("pretrain:yaml:blank_out", ["pretrain", "-c", "{blank_out.yaml}",
                                 *[a for a in BASE["pretrain"][1:] if not a.startswith("run.out_dir")]],
     "{blank_out.yaml}", "'run.out_dir'")
# A key given twice in a YAML mapping (the last used to win silently): file, line and key.
case("pretrain:yaml:dup key", ["pretrain", "-c", "{dup.yaml}", *BASE["pretrain"][1:]], "{dup.yaml} line 3", "'lr'")
case("pretrain:yaml:dup section", ["pretrain", "-c", "{dup_section.yaml}", *BASE["pretrain"][1:]],
     "{dup_section.yaml} line 5", "'run'")
case("pretrain:override dup key", [*BASE["pretrain"], "optim={lr: 0.01, lr: -1}"], "'optim'", "given twice")
# Warm-up past the end of the run (lr would never reach optim.lr).
bad_value("pretrain", "optim.warmup_steps=100000000000000000000")
bad_value("sft", "optim.warmup_steps=5")
case("sft:yaml:warmup", ["sft", "-c", "{warmup.yaml}", *[a for a in BASE["sft"][1:] if not a.startswith("run.max_steps")]],
     "{warmup.yaml}", "'optim.warmup_steps'")
bad_value("demo", "pretrain.optim.warmup_steps=1000000")
# A line that is both prompt/response and messages. (A text ranked against itself is no pair:
# data/preference.py, tests/unit/test_data.py; the app's export may hold one, so it is not refused.)
case("sft:data both.jsonl", [*BASE["sft"], "data.train={both.jsonl}"], "{both.jsonl}:1: has both")
case("ppo:prompts both_prompt.jsonl", [*BASE["ppo"], "prompts={both_prompt.jsonl}"], "{both_prompt.jsonl}:1: has both")
case("fbgen:--prompts both_prompt.jsonl", [*BASE["fbgen"][:4], "{both_prompt.jsonl}", *BASE["fbgen"][5:]],
     "{both_prompt.jsonl}:1: has both")
# Not a regular file (reading /dev/zero would never end), and the YAML file blamed for its own values.
case("pretrain:-c /dev/zero", ["pretrain", "-c", "/dev/zero", *BASE["pretrain"][1:]], "/dev/zero", "not a regular file")
case("sft:data.train /dev/zero", [*BASE["sft"], "data.train=/dev/zero"], "/dev/zero", "not a regular file")
case("tokenizer:inputs /dev/zero", [*BASE["tokenizer"], "inputs=[/dev/zero]"], "/dev/zero", "not a regular file")
case("pretrain:yaml:alias bomb", ["pretrain", "-c", "{bomb.yaml}", *BASE["pretrain"][1:]], "{bomb.yaml}", "aliases")
case("pretrain:yaml:run a list + run.out_dir", ["pretrain", "-c", "{run_list.yaml}", *BASE["pretrain"][1:]],
     "{run_list.yaml}: 'run' must be a mapping")


# ----------------------------------------------------------------------------- the check


def _listing(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


def _fill(template: str, paths: dict) -> str:
    """{name} -> the fixture path of that name (names hold dots, so not str.format); a YAML flow
    mapping such as {lr: 1} (not a fixture's name) is left as it is."""
    return re.sub(r"\{([^{}]+)\}", lambda m: _placeholder(m, paths), template)


def _placeholder(m: re.Match, paths: dict) -> str:
    name = m.group(1)
    return m.group(0) if name not in paths and ": " in name else paths[name]


def outcome(argv: list[str], needles: list[str], is_argparse: bool, paths: dict, work: Path, capsys) -> tuple[str, str]:
    """Run one case: ('clear' | 'traceback' | 'accepted' | 'unclear', details)."""
    from llmtrain.cli import main as cli_main

    fxdir = Path(paths["fxdir"])
    before, fx_before = _listing(work), _listing(fxdir)
    try:
        rc = cli_main(argv)
    except SystemExit as e:
        rc = e.code
    except Exception as e:  # what the suite exists to catch: a traceback for user input
        capsys.readouterr()
        return "traceback", f"{type(e).__name__}: {str(e)[:200]}"
    out, err = capsys.readouterr()
    written = sorted(set(_listing(work)) ^ set(before)) + [k for k, v in _listing(fxdir).items() if fx_before.get(k) != v]
    lines = [l for l in err.strip().splitlines() if l.strip()]
    if "Traceback" in err:
        return "traceback", err[-300:]
    if rc == 0:
        return "accepted", f"exit 0; wrote {written[:3]}; stdout {out[-200:]!r}"
    msg = lines[-1] if lines else ""
    problems = []
    if rc != 2:
        problems.append(f"exit status {rc}")
    if is_argparse:
        if not msg.startswith("llmtrain") or "error:" not in msg:
            problems.append("no argparse error line")
    elif len(lines) != 1 or not msg.startswith("llmtrain"):
        problems.append(f"{len(lines)} lines on stderr")
    missing = [n for n in needles if n not in msg]
    if missing:
        problems.append(f"does not name {missing}")
    if written:
        problems.append(f"wrote {written[:5]}")
    return ("unclear", "; ".join(problems) + f" | {msg[:300]!r}") if problems else ("clear", msg)


@pytest.mark.parametrize("argv,needles,is_argparse", CASES)
def test_bad_cli_input_is_one_clear_line(argv, needles, is_argparse, fx, tmp_path, monkeypatch, capsys, request):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    paths = {**fx, "work": str(work)}
    argv = [_fill(a, paths) for a in argv]
    needles = [_fill(n, paths) for n in needles]
    kind, details = outcome(argv, needles, is_argparse, paths, work, capsys)
    report = os.environ.get("LLMTRAIN_HOSTILE_REPORT")
    if report:
        with open(report, "a") as fh:
            fh.write(json.dumps({"case": request.node.callspec.id, "outcome": kind, "details": details}) + "\n")
    assert kind == "clear", f"{kind}: {details}"
    assert not (work / "out").exists()


def test_there_are_at_least_150_cases():
    assert len(CASES) >= 150


# ----------------------------------------------------------------------------- the real entry point


@pytest.mark.parametrize("args,needle", [
    (["pretrain", "optim.lr=nan", "run.out_dir={work}/out"], "'optim.lr'"),
    (["pretrain", "-c", "{binary.yaml}"], "not UTF-8"),
    (["sft", "init_from={ckpt}", "data.train={deep.jsonl}", "run.out_dir={work}/out"], "JSON nested"),
    (["generate", "{ckpt}", "--top-p", "1.5"], "--top-p"),
    (["feedback", "export", "--db", "{text.db}"], "not an SQLite"),
    (["feedback", "serve", "--db", "{work}/fb.db", "--port", "0", "--model", "tiny={adir}"], "--model tiny="),
    (["demo", "ppo.optim.lr=-1"], "'ppo.optim.lr'"),
])
def test_the_installed_entry_point_prints_one_line(args, needle, fx, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    paths = {**fx, "work": str(work)}
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-m", "llmtrain", *[_fill(a, paths) for a in args]], cwd=work, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and lines[0].startswith("llmtrain "), r.stderr
    assert list(work.iterdir()) == []


def test_generate_says_when_max_new_tokens_does_not_fit(fx, tmp_path, monkeypatch, capsys):
    """Not an error (the answer stops at the end of the context window), but said on stderr."""
    from llmtrain import checkpoint
    from llmtrain.cli import main as cli_main

    ctx = checkpoint.model_config(checkpoint.resolve(fx["ckpt"])).max_seq_len
    monkeypatch.chdir(tmp_path)
    assert cli_main(["generate", fx["ckpt"], "--prompt", "hi", "--max-new-tokens", "1000000000", "--greedy"]) == 0
    err = capsys.readouterr().err
    assert "--max-new-tokens 1000000000 does not fit" in err and f"context window of {ctx} tokens" in err, err
    assert "Traceback" not in err
    assert cli_main(["generate", fx["ckpt"], "--prompt", "hi", "--max-new-tokens", "2", "--greedy"]) == 0
    assert "does not fit" not in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
