"""The stages train on published data shapes (issue #17, Build 2): an HH-RLHF-shaped JSONL file
trains the reward model, an UltraFeedback-binarized-shaped Parquet file trains DPO, a Parquet
prompt/completion file trains SFT, each through its unchanged `data.train` key. The preference
is learnable ("splendid" answers are chosen); the reward model's direction is checked on new
prompts, so a reader that swapped chosen and rejected fails (accuracy alone would not: it is
agreement with whatever the labels say)."""
import pytest

from conftest import WORDS, write_jsonl
from llmtrain.config import DPOConfig, OptimConfig, RewardConfig, RewardDataConfig, RunConfig, SFTConfig, SFTDataConfig
from llmtrain.metrics import read_metrics
from llmtrain.scoring import load_reward_model, score_texts
from llmtrain.stages import dpo, reward, sft

datasets = pytest.importorskip("datasets")


def prompts(n=60):
    return [(f"Describe the {WORDS[i % len(WORDS)]} number {i}", WORDS[i % len(WORDS)]) for i in range(n)]


def run(out, **kw):
    r = dict(out_dir=str(out), max_steps=30, batch_size=4, log_every=5, eval_every=15, seed=1, threads=1)
    r.update(kw)
    return RunConfig(**r)


OPTIM = dict(lr=3e-3, warmup_steps=2, weight_decay=0.0)


def test_reward_model_trains_on_an_hh_rlhf_file(pretrained, tmp_path):
    rows = [{"chosen": f"\n\nHuman: {p}\n\nAssistant: splendid splendid {w}", "rejected": f"\n\nHuman: {p}\n\nAssistant: {w}"}
            for p, w in prompts()]
    data = write_jsonl(tmp_path / "hh.jsonl", rows)
    reward.main(RewardConfig(init_from=str(pretrained), data=RewardDataConfig(train=str(data), val_every=4),
                             optim=OptimConfig(**OPTIM), run=run(tmp_path / "rm"), norm_prompts=4, norm_samples=1,
                             norm_max_new_tokens=4))
    val = read_metrics(tmp_path / "rm", "val")
    assert val[-1]["accuracy"] >= 0.9 and val[-1]["mean_margin"] > 0
    # Chosen is what it learned to prefer: the "splendid" answer scores higher on new prompts.
    model, tok, _ = load_reward_model(tmp_path / "rm")
    for w in WORDS[:5]:
        conv = [{"role": "user", "content": f"Describe the {w} number 99"}]
        good, plain = score_texts(model, tok, [(conv, f"splendid splendid {w}"), (conv, w)])
        assert good > plain, w


def test_dpo_trains_on_an_ultrafeedback_parquet_file(pretrained, tmp_path):
    rows = [{"prompt": p, "prompt_id": str(i), "chosen": [{"role": "user", "content": p}, {"role": "assistant", "content": f"splendid splendid {w}"}],
             "rejected": [{"role": "user", "content": p}, {"role": "assistant", "content": w}],
             "messages": [{"role": "user", "content": p}, {"role": "assistant", "content": f"splendid splendid {w}"}],
             "score_chosen": 8.0, "score_rejected": 3.0} for i, (p, w) in enumerate(prompts())]
    data = tmp_path / "uf.parquet"
    datasets.Dataset.from_list(rows).to_parquet(str(data))
    dpo.main(DPOConfig(policy=str(pretrained), data=RewardDataConfig(train=str(data), val_every=4, min_score_gap=1.0),
                       beta=0.5, optim=OptimConfig(**OPTIM), run=run(tmp_path / "dpo", max_steps=20, eval_every=10)))
    val = read_metrics(tmp_path / "dpo", "val")
    assert val[-1]["accuracy"] >= 0.9 and val[-1]["margin"] > val[0]["margin"]


def test_sft_trains_on_a_parquet_prompt_completion_file(pretrained, tmp_path):
    rows = [{"prompt": f"Tell me about the {w}", "completion": f"Indeed, the {w} is splendid, old chap."} for _, w in prompts(80)]
    data = tmp_path / "sft.parquet"
    datasets.Dataset.from_list(rows).to_parquet(str(data))
    cfg = SFTConfig(init_from=str(pretrained), data=SFTDataConfig(train=str(data), val_every=5),
                    optim=OptimConfig(lr=1e-2, warmup_steps=2, weight_decay=0.0), run=run(tmp_path / "sft", max_steps=30, eval_every=15),
                    sample_prompts=1, sample_tokens=4)
    sft.main(cfg)
    v = [r["loss"] for r in read_metrics(tmp_path / "sft", "val")]
    assert v[-1] < 0.6 * v[0]


def test_column_map_from_the_config_and_its_errors(pretrained, tmp_path):
    """data.columns maps our field names to a file's own (here a CSV of question/answer), given
    in the YAML or on the command line; a column it names that the file lacks, and a value that is
    not a mapping, are one line naming the file and column, or the key."""
    import csv

    from llmtrain.config import load_config
    from llmtrain.errors import ConfigError, DataError

    data = tmp_path / "qa.csv"
    with open(data, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["question", "answer"])
        w.writerows([(f"Tell me about the {x}", f"Indeed, the {x} is splendid.") for _, x in prompts(30)])
    yaml_file = tmp_path / "sft.yaml"
    yaml_file.write_text("data:\n  columns: {prompt: question}\n")
    base = [f"init_from={pretrained}", f"data.train={data}", "data.val_every=5", f"run.out_dir={tmp_path / 'sft'}",
            "run.max_steps=2", "run.batch_size=4", "run.threads=1", "sample_prompts=0"]
    cfg = load_config(SFTConfig, yaml_file, [*base, "data.columns.response=answer"])
    assert cfg.data.columns == {"prompt": "question", "response": "answer"}
    sft.main(cfg)
    assert [r["step"] for r in read_metrics(tmp_path / "sft", "train")][-1] == 2

    bad = load_config(SFTConfig, None, [*base, f"run.out_dir={tmp_path / 'bad'}", "data.columns.prompt=query"])
    with pytest.raises(DataError) as e:
        sft.main(bad)
    assert str(e.value).startswith(f"{data}: no column 'query'") and "\n" not in str(e.value)
    with pytest.raises(ConfigError, match=r"'data.columns' must be a mapping of string to string, got 5"):
        load_config(SFTConfig, None, [*base, "data.columns=5"])
