"""Collapse figures of a model's answers, against values worked by hand, and the rows the
evaluation's KL is measured on."""
import pytest
import torch

from llmtrain.rl import rollout_rows
from llmtrain.scoring import collapse_stats


def test_collapse_figures_by_hand():
    texts = ["I say old chap", "I say old chap", "good day", ""]
    s = collapse_stats(texts)
    # 3 distinct texts of 4; bigrams: (I say)(say old)(old chap) twice + (good day) = 7, 4 distinct;
    # words 4 + 4 + 2 + 0 over 4 answers.
    assert s["distinct"] == 0.75
    assert s["distinct2"] == pytest.approx(4 / 7)
    assert s["mean_words"] == 2.5


def test_collapse_figures_edge_cases():
    assert collapse_stats(["yes", "no"]) == {"distinct": 1.0, "distinct2": 0.0, "mean_words": 1.0}  # no bigrams
    # 5 copies of (a b)(b a)(a b): 15 bigrams, 2 distinct.
    assert collapse_stats(["a b a b"] * 5) == {"distinct": 0.2, "distinct2": pytest.approx(2 / 15), "mean_words": 4.0}
    # Bigrams do not cross answers: "a" + "b" makes none.
    assert collapse_stats(["a", "b"])["distinct2"] == 0.0
    assert collapse_stats([]) == {"distinct": 0.0, "distinct2": 0.0, "mean_words": 0.0}


def test_rollout_rows():
    ids, mask, pos, amask = rollout_rows([[1, 2, 3], [4]], [[5, 6], []], pad_id=0)
    assert ids.tolist() == [[1, 2, 3, 5, 6], [0, 0, 4, 0, 0]]
    assert mask.tolist() == [[1, 1, 1, 1, 1], [0, 0, 1, 0, 0]]
    assert pos.tolist() == [[0, 1, 2, 3, 4], [0, 0, 0, 0, 0]]
    # Targets 1..4: the answer tokens of row 0 are targets 3 and 4 (mask positions 2, 3).
    assert amask.tolist() == [[0, 0, 1, 1], [0, 0, 0, 0]]


def test_report_methods_table_flags_collapse_and_hacking():
    from llmtrain.report import methods_of, methods_table

    def e(distinct_b, win_rm, win_true):
        return {"win_rate_b_by_reward_model": win_rm, "win_rate_b_by_true_rule": win_true, "hacking_gap": win_rm - win_true,
                "distinct_a": 0.9, "distinct_b": distinct_b, "distinct2_a": 0.7, "distinct2_b": 0.5,
                "mean_words_a": 12.0, "mean_words_b": 9.5, "kl_b": 1.25, "kl_b_k3": 1.0}

    ev = {"dpo": e(0.8, 0.5, 0.5), "grpo": e(0.4, 0.9, 0.3), "ppo": e(0.45, 0.6, 0.5)}
    ev["ppo"]["sampled"] = {"per_prompt": 8, "win_rate_b_by_true_rule": 0.875, "win_rate_b_by_reward_model": 0.625}
    assert methods_of(ev) == ["ppo", "grpo", "dpo"]
    header, rows, warnings = methods_table(ev)
    assert [row[0] for row in rows] == ["SFT (reference)", "PPO", "GRPO", "DPO"] and all(len(x) == len(header) for x in rows)
    assert rows[0][6] == "90%" and rows[2][1:7] == ["30%", "90%", "+60 points", "—", "1.250", "40%"]
    assert rows[1][4] == "88% / 62%"  # sampled answers (evaluate.samples): true rule / reward model
    # 40% < half of 90%: collapse; 45% is not under half. GRPO's 60-point gap is hacking.
    assert warnings == ["collapse: GRPO answers 40% distinct vs SFT's 90%",
                        "reward hacking: GRPO wins 90% by the reward model but 30% by the true rule"]
