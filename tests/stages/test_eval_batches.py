"""`run.eval_batches` means one thing in every stage: batches per evaluation, 0 the whole
held-out set (issue #16, "one meaning per key name"). Classify, reward and DPO evaluate the
first run.eval_batches batches of their held-out set; with 0 (their default) all of it."""
import pytest

from conftest import WORDS, write_jsonl
from llmtrain.config import (ClassifyConfig, ClassifyDataConfig, DPOConfig, OptimConfig, RewardConfig, RewardDataConfig,
                             RunConfig)
from llmtrain.metrics import read_metrics

K = 3  # answers per prompt: 3 pairs per ranking


def config(stage: str, pretrained, tmp_path, eval_batches: int):
    tmp_path.mkdir(parents=True, exist_ok=True)
    run = RunConfig(out_dir=str(tmp_path / stage), max_steps=1, batch_size=2, log_every=1, eval_every=1,
                    eval_batches=eval_batches, seed=5, threads=1, device="cpu", precision="fp32")
    optim = OptimConfig(lr=1e-3, warmup_steps=0, weight_decay=0.0)
    if stage == "classify":
        rows = [{"text": f"{WORDS[i % 10]} {WORDS[i % 10]}", "label": "first"} if i % 2 else
                {"text": f"{WORDS[10 + i % 10]} {WORDS[10 + (i * 7) % 10]}", "label": "second"} for i in range(40)]
        data = ClassifyDataConfig(train=str(write_jsonl(tmp_path / "c.jsonl", rows)), val_every=4)  # 10 held out
        return ClassifyConfig(init_from=str(pretrained), data=data, optim=optim, run=run)
    rows = [{"prompt": f"Describe the {w} number {i}",
             "ranked": [{"text": " ".join(["splendid"] * (K - j) + [w]), "rank": j + 1} for j in range(K)]}
            for i, w in zip(range(40), WORDS * 2)]
    data = RewardDataConfig(train=str(write_jsonl(tmp_path / "r.jsonl", rows)), val_every=3)
    if stage == "dpo":
        return DPOConfig(policy=str(pretrained), data=data, optim=optim, run=run)
    return RewardConfig(init_from=str(pretrained), data=data, optim=optim, run=run, norm_prompts=1, norm_samples=1,
                        norm_max_new_tokens=4)


def evaluated(stage: str, run_dir) -> int:
    """How many held-out items the last evaluation read: texts (classify) or pairs."""
    val = [r for r in read_metrics(run_dir) if r["kind"] == "val"][-1]
    return sum(map(sum, val["confusion"])) if stage == "classify" else val["pairs"]


@pytest.mark.parametrize("stage", ["classify", "reward", "dpo"])
def test_eval_batches_counts_batches_and_zero_is_the_whole_held_out_set(stage, pretrained, tmp_path):
    from llmtrain.stages import classify, dpo, reward

    main = {"classify": classify.main, "reward": reward.main, "dpo": dpo.main}[stage]
    main(config(stage, pretrained, tmp_path / "one", eval_batches=1))
    main(config(stage, pretrained, tmp_path / "all", eval_batches=0))
    one, whole = evaluated(stage, tmp_path / "one" / stage), evaluated(stage, tmp_path / "all" / stage)
    per_item = 1 if stage == "classify" else K  # a ranking of K answers gives K pairs (no ties)
    assert one == 2 * per_item  # one batch of run.batch_size=2
    assert whole > one and whole % per_item == 0
