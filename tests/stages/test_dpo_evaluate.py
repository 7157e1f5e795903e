"""DPO on toy rankings raises held-out reward accuracy; evaluate compares two checkpoints."""
import json
import math

import torch
from conftest import write_jsonl
from test_reward import reward_config, toy_rankings

from llmtrain import checkpoint
from llmtrain.cli import main as cli_main
from llmtrain.config import DPOConfig, OptimConfig, RewardDataConfig, RunConfig
from llmtrain.data.preference import Ranking
from llmtrain.metrics import read_metrics
from llmtrain.model import Transformer
from llmtrain.stages import dpo
from llmtrain.tokenizer import Tokenizer, render_answer


def test_packed_answer_logprobs_equal_one_answer_at_a_time(pretrained):
    tok = Tokenizer.load(checkpoint.tokenizer_of(pretrained))
    model = Transformer(checkpoint.model_config(pretrained)).eval()
    checkpoint.load_weights(pretrained, model)
    rows = [Ranking([{"role": "user", "content": "Describe the apple"}], ["splendid apple", "apple", "a pear"], [1, 2, 3],
                    finished=[True, True, False]),
            Ranking([{"role": "user", "content": "Hello there, how are you today?"}], ["quite so", "no"], [1, 2])]
    with torch.no_grad():
        packed, starts = dpo.answer_logprobs(model, tok, rows, 64, torch.device("cpu"))
        alone = []
        for r in rows:
            for t, f in zip(r.texts, r.finished_flags):
                ids, mask = render_answer(tok, r.messages, t, f)
                logp = torch.log_softmax(model(torch.tensor([ids[:-1]]))[0].float(), -1)
                alone.append(sum(logp[p, ids[p + 1]].item() for p in range(len(ids) - 1) if mask[p + 1]))
    assert starts == [0, 3]
    torch.testing.assert_close(packed, torch.tensor(alone), atol=1e-4, rtol=1e-5)


def test_dpo_learns_the_preference(pretrained, tmp_path):
    data = write_jsonl(tmp_path / "r.jsonl", toy_rankings())
    dpo.main(DPOConfig(policy=str(pretrained), data=RewardDataConfig(train=str(data), val_every=4), beta=0.5,
                       optim=OptimConfig(lr=3e-3, warmup_steps=2, weight_decay=0.0),
                       run=RunConfig(out_dir=str(tmp_path / "dpo"), max_steps=20, batch_size=4, eval_every=10,
                                     log_every=5, threads=1)))
    val = read_metrics(tmp_path / "dpo", "val")
    assert val[0]["step"] == 0 and val[-1]["accuracy"] >= 0.9 and val[-1]["margin"] > val[0]["margin"]


def test_evaluate_reports_win_rates(pretrained, tmp_path, capsys):
    from llmtrain.stages import reward

    data = write_jsonl(tmp_path / "r.jsonl", toy_rankings())
    reward.main(reward_config(pretrained, data, tmp_path / "rm", max_steps=5, eval_every=0))
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"Say hi {i}"} for i in range(20)])
    out = tmp_path / "cmp.json"
    assert cli_main(["evaluate", f"a={pretrained}", f"b={pretrained}", f"reward_model={tmp_path / 'rm'}",
                     f"prompts={prompts}", "val_every=2", "true_rule=aristocrat", "max_new_tokens=8", f"out={out}"]) == 0
    r = json.loads(out.read_text())
    assert r["prompts"] == 10 and r["reward_a"] == r["reward_b"]
    assert r["win_rate_b_by_reward_model"] == 0.5 and r["win_rate_b_by_true_rule"] == 0.5  # identical models tie
    printed = capsys.readouterr().out
    assert "wins 50% by the reward model" in printed and "distinct answers" in printed and "KL to the baseline" in printed
    # Collapse figures: the same model gives the same figures on both sides.
    for k in ("distinct", "distinct2", "mean_words"):
        assert r[f"{k}_a"] == r[f"{k}_b"], k
    assert 0 < r["distinct_b"] <= 1 and 0 <= r["distinct2_b"] <= 1 and r["mean_words_b"] >= 0
    assert r["hacking_gap"] == 0.0
    # KL of a model to itself on its own sampled answers: exactly zero, both estimators.
    assert r["kl_b"] == 0.0 and r["kl_b_k3"] == 0.0


def test_sampled_kl_of_a_changed_model(pretrained):
    from llmtrain.scoring import sampled_kl

    tok = Tokenizer.load(checkpoint.tokenizer_of(pretrained))
    a, b = (Transformer(checkpoint.model_config(pretrained)).eval() for _ in range(2))
    checkpoint.load_weights(pretrained, a)
    checkpoint.load_weights(pretrained, b)
    convs = [[{"role": "user", "content": f"Say hi {i}"}] for i in range(6)]
    assert sampled_kl(b, a, tok, convs, 8) == {"kl": 0.0, "kl_k3": 0.0}
    with torch.no_grad():
        b.lm_head.weight.mul_(1.5)  # sharper next-token distributions: a different policy
    kl = sampled_kl(b, a, tok, convs, 8, seed=0)
    assert kl == sampled_kl(b, a, tok, convs, 8, seed=0)  # seeded
    assert math.isfinite(kl["kl"]) and math.isfinite(kl["kl_k3"]) and kl["kl_k3"] > 0
