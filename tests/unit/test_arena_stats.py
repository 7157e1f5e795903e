"""The arena's statistics (llmtrain/feedback/arena_stats.py) against values worked out by hand.

Wilson score interval of p = x/n at z = 1.959964 (z^2 = 3.841459):
    centre = (p + z^2/2n) / (1 + z^2/n),  half = z sqrt(p(1-p)/n + z^2/4n^2) / (1 + z^2/n)

Bradley-Terry (log-odds scores, P(i beats j) = 1/(1 + exp(s_j - s_i))), three models:
    A beats B 2 of 3, B beats C 2 of 3, A beats C 4 of 5.
Strengths 4 : 2 : 1 give P(A>B) = 4/6 = 2/3, P(B>C) = 2/3, P(A>C) = 4/5: every pair's observed
share exactly, so the likelihood equations (points = expected points, per model) hold and the
MLE is log-scores ln 4, ln 2, 0, centred (mean ln 2 subtracted): ln 2, 0, -ln 2.
Fisher information, n p (1 - p) per pair: AB 3 (2/3)(1/3) = 2/3, BC 2/3, AC 5 (4/5)(1/5) = 4/5:
    I = [[2/3 + 4/5, -2/3, -4/5], [-2/3, 4/3, -2/3], [-4/5, -2/3, 4/5 + 2/3]]
With C anchored at 0, the covariance of (s_A, s_B) is the inverse of the top-left block
[[22/15, -2/3], [-2/3, 4/3]], det = 88/45 - 20/45 = 68/45:
    (45/68) [[4/3, 2/3], [2/3, 22/15]] -> var s_A = 15/17, var s_B = 33/34, cov = 15/34.
Centred scores s_i - (s_A + s_B + s_C)/3 with s_C = 0: s_A' = (2 s_A - s_B)/3,
s_B' = (2 s_B - s_A)/3, s_C' = -(s_A + s_B)/3, so
    var s_A' = (4 (15/17) - 4 (15/34) + 33/34) / 9 = (93/34) / 9 = 31/102
    var s_B' = (4 (33/34) - 4 (15/34) + 15/17) / 9 = (102/34) / 9 = 1/3
    var s_C' = (15/17 + 33/34 + 2 (15/34)) / 9 = (93/34) / 9 = 31/102
"""
from __future__ import annotations

import math

import pytest

from llmtrain.feedback.arena_stats import Z95, bradley_terry, pair_table, summary, wilson


def votes(a: str, b: str, a_wins: int, b_wins: int, ties: int = 0, both_bad: int = 0, swap_every: int = 2) -> list[dict]:
    """Votes on the pair (a, b) with the models on alternating sides (the side must not matter)."""
    out = []
    for k, (winner, n) in enumerate(((a, a_wins), (b, b_wins), (None, ties), ("bad", both_bad))):
        for i in range(n):
            x, y = (a, b) if i % swap_every == 0 else (b, a)
            vote = "tie" if winner is None else "both_bad" if winner == "bad" else ("a" if winner == x else "b")
            out.append({"a": x, "b": y, "vote": vote})
    return out


THREE = votes("A", "B", 2, 1) + votes("B", "C", 2, 1) + votes("A", "C", 4, 1)


def test_wilson_against_hand_computed_values():
    assert Z95 == pytest.approx(1.959964, abs=1e-6)
    # 7 of 10: centre (0.7 + 0.1920729) / 1.3841459 = 0.6444932; half 1.959964 sqrt(0.021 + 0.0096036)
    # / 1.3841459 = 1.959964 x 0.1749390 / 1.3841459 = 0.2477148 -> (0.396778, 0.892208)
    lo, hi = wilson(7, 10)
    assert lo == pytest.approx(0.396778, abs=1e-6) and hi == pytest.approx(0.892208, abs=1e-6)
    # 0 of 5: centre (0 + 0.384146) / 1.768292 = 0.217241 = half -> (0, 0.434482)
    lo, hi = wilson(0, 5)
    assert lo == pytest.approx(0.0, abs=1e-12) and hi == pytest.approx(0.434482, abs=1e-6)
    assert wilson(0, 0) is None


def test_ties_and_both_bad_count_half_in_a_pairs_win_rate():
    # y against x: 3 wins, 1 loss, 4 ties, 2 both bad -> points 3 + 0.5 x 6 = 6 of 10: p = 0.6.
    # Wilson of 6/10: centre (0.6 + 0.1920729) / 1.3841459 = 0.5722469; half 1.959964 sqrt(0.024 + 0.0096036)
    # / 1.3841459 = 1.959964 x 0.1833130 / 1.3841459 = 0.2595719 -> (0.312675, 0.831819)
    rows = pair_table(votes("x", "y", 1, 3, ties=4, both_bad=2), order=["x", "y"])
    assert len(rows) == 1
    r = rows[0]
    assert (r["model"], r["against"], r["votes"], r["wins"], r["losses"], r["ties"], r["both_bad"]) == \
        ("y", "x", 10, 3, 1, 4, 2)
    assert r["win_rate"] == pytest.approx(0.6)
    assert r["lo"] == pytest.approx(0.312675, abs=2e-6) and r["hi"] == pytest.approx(0.831819, abs=2e-6)
    # 6 wins and 2 losses with 2 ties is the same 7 points of 10 as 7 wins, 3 losses
    same = pair_table(votes("x", "y", 2, 6, ties=2), order=["x", "y"])[0]
    seven = pair_table(votes("x", "y", 3, 7), order=["x", "y"])[0]
    assert (same["win_rate"], same["lo"], same["hi"]) == pytest.approx((seven["win_rate"], seven["lo"], seven["hi"]))
    assert seven["lo"] == pytest.approx(0.396778, abs=1e-6)


def test_bradley_terry_three_models_hand_worked():
    bt = bradley_terry(THREE, order=["A", "B", "C"])
    assert bt["finite"] and bt["centred"] and bt["anchor"] is None and "log-odds" in bt["scale"]
    got = {m["model"]: m for m in bt["models"]}
    want = {"A": (math.log(2), 31 / 102), "B": (0.0, 1 / 3), "C": (-math.log(2), 31 / 102)}
    for name, (score, var) in want.items():
        assert got[name]["score"] == pytest.approx(score, abs=1e-9), name
        assert got[name]["se"] == pytest.approx(math.sqrt(var), abs=1e-9), name
        assert got[name]["lo"] == pytest.approx(score - Z95 * math.sqrt(var), abs=1e-9)
        assert got[name]["hi"] == pytest.approx(score + Z95 * math.sqrt(var), abs=1e-9)
    assert [got[m]["votes"] for m in "ABC"] == [8, 6, 8]


def test_bradley_terry_with_an_anchor():
    bt = bradley_terry(THREE, order=["A", "B", "C"], anchor="C")
    got = {m["model"]: m for m in bt["models"]}
    assert not bt["centred"] and bt["anchor"] == "C"
    assert got["A"]["score"] == pytest.approx(math.log(4), abs=1e-9)
    assert got["B"]["score"] == pytest.approx(math.log(2), abs=1e-9)
    assert got["C"]["score"] == 0.0 and got["C"]["se"] == pytest.approx(0.0, abs=1e-9)
    assert got["A"]["se"] == pytest.approx(math.sqrt(15 / 17), abs=1e-9)
    assert got["B"]["se"] == pytest.approx(math.sqrt(33 / 34), abs=1e-9)


def test_bradley_terry_two_models_seven_to_three():
    # The difference is the log-odds of the share: ln(7/3); its variance 1 / (n p (1-p)) = 1 / (10 x 0.21).
    # Centred, each score is half the difference, with a quarter of the variance: 1 / 8.4.
    bt = bradley_terry(votes("x", "y", 7, 3), order=["x", "y"])
    x, y = bt["models"]
    assert x["score"] - y["score"] == pytest.approx(math.log(7 / 3), abs=1e-9)
    assert x["score"] == pytest.approx(math.log(7 / 3) / 2, abs=1e-9)
    assert x["se"] == pytest.approx(math.sqrt(1 / 8.4), abs=1e-9) and y["se"] == pytest.approx(math.sqrt(1 / 8.4), abs=1e-9)
    anchored = bradley_terry(votes("x", "y", 7, 3), order=["x", "y"], anchor="y")["models"][0]
    assert anchored["se"] == pytest.approx(math.sqrt(1 / 2.1), abs=1e-9)
    # a tie is half a win each: 6 wins, 2 losses and 2 ties give the same scores
    tied = bradley_terry(votes("x", "y", 6, 2, ties=1, both_bad=1), order=["x", "y"])["models"][0]
    assert tied["score"] == pytest.approx(x["score"], abs=1e-9) and tied["se"] == pytest.approx(x["se"], abs=1e-9)


@pytest.mark.parametrize("vs, why", [
    (votes("x", "y", 3, 0), "x won every vote it was in"),
    (THREE + votes("D", "A", 2, 0), "D won every vote it was in"),
    (THREE + votes("D", "C", 0, 2), "D lost every vote it was in"),
    (votes("p", "q", 2, 1) + votes("r", "s", 1, 2), "never met"),
    ([], "fewer than two models have votes"),
])
def test_no_finite_maximum_is_said_not_guessed(vs, why):
    bt = bradley_terry(vs)
    assert not bt["finite"] and why in bt["why"]
    assert all(m["score"] is None and m["lo"] is None for m in bt["models"])


def test_summary_counts_votes_by_kind():
    s = summary(votes("x", "y", 1, 3, ties=4, both_bad=2), order=["x", "y"])
    assert s["votes"] == 10 and s["counts"] == {"a": s["counts"]["a"], "b": s["counts"]["b"], "tie": 4, "both_bad": 2}
    assert s["counts"]["a"] + s["counts"]["b"] == 4 and s["bradley_terry"]["finite"]
    with pytest.raises(ValueError, match="anchor 'z'"):
        bradley_terry(THREE, anchor="z")
