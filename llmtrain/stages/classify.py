"""A task-specific head: fine-tune the backbone with a classification layer on labelled text.

    llmtrain classify -c configs/classify.yaml init_from=runs/pretrain
    llmtrain classify predict runs/classify --text "..." [--input texts.jsonl]

The word head is replaced by `score` (n_labels outputs) read at the text's final token;
cross-entropy over labels; accuracy and a confusion matrix on held-out data.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from llmtrain import checkpoint, dist, training
from llmtrain.config import ClassifyConfig, to_dict
from llmtrain.data import classify as cls_data
from llmtrain.data.sft import LengthBatches, split
from llmtrain.errors import CheckpointError, ConfigError, DataError
from llmtrain.metrics import Metrics, Progress, fmt_duration
from llmtrain.model.adapters import freeze
from llmtrain.model.heads import ScoreModel
from llmtrain.tokenizer import Tokenizer
from llmtrain.training import count_params, lr_at, optimizer_step, set_lr


def main(cfg: ClassifyConfig) -> Path:
    run = cfg.run
    env = dist.setup(run.device, run.threads)
    run_dir = Path(run.out_dir)
    if not cfg.init_from:
        raise ConfigError("init_from is not set: give a pretrained or fine-tuned checkpoint")

    # ---- data, labels, model
    base = checkpoint.resolve(cfg.init_from)
    tok_path = checkpoint.tokenizer_of(base)
    tok = Tokenizer.load(tok_path)
    mcfg = checkpoint.model_config(base)
    max_len = cfg.data.max_len or mcfg.max_seq_len
    items, skipped = cls_data.read(cfg.data.train, cfg.data.skip_bad_lines)
    if cfg.data.val:
        train_items = items
        val_items, more = cls_data.read(cfg.data.val, cfg.data.skip_bad_lines)
        skipped += more
    else:
        train_items, val_items = split(items, cfg.data.val_every)
    labels = sorted({label for _, (_, label) in train_items})
    unknown = sorted({label for _, (_, label) in val_items} - set(labels))
    if unknown:
        raise DataError(f"held-out labels never seen in training: {', '.join(unknown)}")
    if len(labels) < 2:
        raise DataError(f"{cfg.data.train}: at least two labels are needed, found {labels}")
    train_ex = cls_data.encode(tok, train_items, labels, max_len)
    val_ex = cls_data.encode(tok, val_items, labels, max_len)

    torch.manual_seed(run.seed)
    model = ScoreModel(mcfg, len(labels))
    checkpoint.load_weights(base, model, new_head=("score.",))
    frozen = freeze(model, cfg.freeze.patterns, cfg.freeze.first_layers)
    model.to(env.device)
    train_model, optimizer, resumed, done = training.prepare(model, cfg.optim, run, env, run_dir)
    start_step = done.get("step", 0)
    batches = LengthBatches(train_ex, run.batch_size * run.grad_accum * env.world, run.seed)

    log = Metrics(run_dir, enabled=env.is_main, tensorboard=run.tensorboard, resume_step=start_step if resumed else None)
    trainable, total = count_params(model)
    log.print(f"classify: {len(labels)} labels {labels}; {len(train_ex)} train / {len(val_ex)} held-out texts "
              f"({skipped} bad lines skipped); {trainable / 1e6:.2f}M of {total / 1e6:.2f}M parameters trainable "
              f"({len(frozen)} tensors frozen)")
    global_batch = run.batch_size * run.grad_accum * env.world

    def evaluate() -> dict:
        model.eval()
        confusion = torch.zeros(len(labels), len(labels), dtype=torch.long)
        with torch.no_grad(), dist.autocast(env.device, run.precision):
            for i in range(0, len(val_ex), run.batch_size):
                rows = val_ex[i:i + run.batch_size]
                x, lengths = cls_data.collate(rows, tok.pad_id)
                pred = model(x.to(env.device), lengths).argmax(-1).cpu()
                for r, p in zip(rows, pred.tolist()):
                    confusion[r.label, p] += 1
        model.train()
        acc = float(confusion.diag().sum() / confusion.sum().clamp(min=1))
        return {"accuracy": acc, "confusion": confusion.tolist()}

    # ---- the loop
    model.train()
    progress = Progress(start_step, run.max_steps, start_step * global_batch, unit="texts")
    result = {}
    for step in range(start_step, run.max_steps):
        lr = lr_at(step, cfg.optim, run.max_steps)
        set_lr(optimizer, lr)

        def loss_of(micro, m):
            rows = batches.rows(step, run.batch_size, micro, env.rank, env.world)
            x, lengths = cls_data.collate(rows, tok.pad_id)
            y = torch.tensor([r.label for r in rows], device=env.device)
            # Sum over this micro-batch's rows / the global batch: the step's mean over all rows.
            return F.cross_entropy(m(x.to(env.device), lengths).float(), y, reduction="sum") * env.world / global_batch

        step_loss = training.accumulate(train_model, run.grad_accum, loss_of, env, run.precision)
        grad_norm = optimizer_step(model, optimizer, cfg.optim.grad_clip)
        done = step + 1
        if done % run.log_every == 0 or done == run.max_steps:
            loss_v = float(dist.all_reduce_mean(step_loss, env))
            line, _ = progress.line(done, done * global_batch, loss=loss_v, lr=lr, gnorm=grad_norm)
            log.log(done, "train", loss=loss_v, lr=lr, grad_norm=grad_norm)
            log.print(line)
        if (run.eval_every and done % run.eval_every == 0) or done == run.max_steps:
            result = evaluate()
            log.log(done, "val", **result)
            log.print(f"step {done:>6} | held-out accuracy {result['accuracy']:.3f}")
        if (run.save_every and done % run.save_every == 0) or done == run.max_steps:
            checkpoint.save(run_dir, done, model,
                            config={"model": to_dict(mcfg), "stage": "classify", "labels": labels, "config": to_dict(cfg)},
                            meta={"tokens": 0, "accuracy": result.get("accuracy")}, tokenizer_path=str(tok_path),
                            optimizer=optimizer, rng=dist.rng_state(), keep_last=run.keep_last, rank=env.rank,
                            barrier=lambda: dist.barrier(env))
    if result:
        log.print("confusion matrix (rows: true label, columns: predicted)\n" + format_confusion(labels, result["confusion"]))
    log.print(f"classify done in {fmt_duration(progress.elapsed())}; {'checkpoint in ' + str(run_dir / 'checkpoints') if checkpoint.step_dirs(run_dir) else 'no checkpoint written (run.max_steps=0)'}")
    log.close()
    dist.teardown()
    return run_dir


def format_confusion(labels: list[str], confusion: list[list[int]]) -> str:
    w = max(6, *(len(l) for l in labels))
    head = " " * w + " " + " ".join(f"{l[:w]:>{w}}" for l in labels)
    rows = [f"{l:>{w}} " + " ".join(f"{n:>{w}}" for n in r) for l, r in zip(labels, confusion)]
    return "\n".join([head, *rows])


def load_classifier(ckpt: str | Path, device: str = "auto") -> tuple[ScoreModel, Tokenizer, list[str]]:
    ckpt = checkpoint.resolve(ckpt)
    conf = checkpoint.read_config(ckpt)
    if conf.get("stage") != "classify":
        raise CheckpointError(f"{ckpt}: not a classifier checkpoint (stage {conf.get('stage')!r})")
    labels = conf["labels"]
    model = ScoreModel(checkpoint.model_config(ckpt), len(labels))
    checkpoint.load_weights(ckpt, model)
    model.to(dist.pick_device(device)).eval()
    return model, Tokenizer.load(checkpoint.tokenizer_of(ckpt)), labels


@torch.no_grad()
def predict(model: ScoreModel, tok: Tokenizer, labels: list[str], texts: list[str], batch_size: int = 32) -> list[dict]:
    """-> [{"label": name, "probs": {name: p}}] for each text."""
    out = []
    device = next(model.parameters()).device
    for i in range(0, len(texts), batch_size):
        seqs = [cls_data.encode_text(tok, t, model.config.max_seq_len) for t in texts[i:i + batch_size]]
        x, lengths = cls_data.collate(seqs, tok.pad_id)
        probs = torch.softmax(model(x.to(device), lengths).float(), -1).cpu()
        for p in probs:
            out.append({"label": labels[int(p.argmax())], "probs": {l: round(float(v), 4) for l, v in zip(labels, p)}})
    return out
