"""Statistics of the blind arena's votes: each pair's win rate with a 95% Wilson interval, and
Bradley-Terry scores of all models with 95% Wald intervals. Pure Python (the web app shows them
and loads no torch or numpy).

A vote is {"a": model on side A, "b": model on side B, "vote": "a" | "b" | "tie" | "both_bad"}.
Points: the winner of a vote gets 1, the loser 0; a tie gives each model 1/2, and so does "both
bad": for scores it is a tie (neither answer was preferred). The export keeps the difference
(export.py: a tie is one tier of two, "both bad" is status all_bad, neither a preference pair).

Win rate of model m against model o: (m's points) / (votes on the pair); its 95% Wilson score
interval with z = 1.95996 (half points in the successes, which the formula takes as they are):
    (p + z^2/2n -+ z sqrt(p(1-p)/n + z^2/4n^2)) / (1 + z^2/n)

Bradley-Terry: P(i beats j) = 1 / (1 + exp(s_j - s_i)), fitted by maximum likelihood to the
points (W_ij: i's points against j, N_ij: votes on the pair) with Newton's method (step halving
if the likelihood would fall). Scores are on the log-odds scale (natural log: exp(s_i - s_j) is
the odds that i beats j; x 400/ln(10) = 173.7 gives Elo points) and centred: they sum to 0
(or, with `anchor`, the anchor model is 0). Standard errors come from the Fisher information
I (I_ii = sum_j N_ij p_ij (1 - p_ij), I_ij = -N_ij p_ij (1 - p_ij)) at the maximum: the
covariance of the centred scores is its pseudo-inverse I+ = (I + 11'/M)^-1 - 11'/M, and the
interval is s +- z se (Wald). A finite maximum exists only when the models cannot be split into
two groups one of which took no point from the other (e.g. a model that won every vote): then
no scores are given, and `why` says which model or group it is.
"""
from __future__ import annotations

import math
from statistics import NormalDist

Z95 = NormalDist().inv_cdf(0.975)  # 1.959963984540054
POINTS = {"a": (1.0, 0.0), "b": (0.0, 1.0), "tie": (0.5, 0.5), "both_bad": (0.5, 0.5)}
SCALE = "log-odds (natural log): exp(s_i - s_j) is the odds that model i beats model j"


def wilson(points: float, n: float, z: float = Z95) -> tuple[float, float] | None:
    """The Wilson score interval of a proportion points/n (None for n = 0)."""
    if n <= 0:
        return None
    p = points / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def _tally(votes: list[dict], order: list[str] | None) -> tuple[list[str], dict]:
    """Models (in `order`, then by first appearance) and per ordered pair (i, j): [i's points
    against j, wins, losses, ties, both bad]."""
    names = list(order or [])
    t: dict[tuple[str, str], list[float]] = {}
    for v in votes:
        for m in (v["a"], v["b"]):
            if m not in names:
                names.append(m)
        pa, pb = POINTS[v["vote"]]
        for me, other, pts in ((v["a"], v["b"], pa), (v["b"], v["a"], pb)):
            row = t.setdefault((me, other), [0.0, 0, 0, 0, 0])
            row[0] += pts
            row[1 if pts == 1 else 2 if pts == 0 else 3 if v["vote"] == "tie" else 4] += 1
    return names, t


def pair_table(votes: list[dict], order: list[str] | None = None, z: float = Z95) -> list[dict]:
    """One row per pair of models that met: the later model in `order` against the earlier one
    (so with the baseline first, each row is a challenger's win rate against it)."""
    names, t = _tally(votes, order)
    rows = []
    for j, model in enumerate(names):
        for against in names[:j]:
            if (model, against) not in t:
                continue
            pts, wins, losses, ties, both_bad = t[(model, against)]
            n = wins + losses + ties + both_bad
            lo, hi = wilson(pts, n, z)
            rows.append({"model": model, "against": against, "votes": n, "wins": wins, "losses": losses, "ties": ties,
                         "both_bad": both_bad, "win_rate": pts / n, "lo": lo, "hi": hi})
    return rows


def _inverse(a: list[list[float]]) -> list[list[float]]:
    """Gauss-Jordan with partial pivoting (a is small: one row per model)."""
    n = len(a)
    m = [row[:] + [float(i == j) for j in range(n)] for i, row in enumerate(a)]
    for c in range(n):
        p = max(range(c, n), key=lambda r: abs(m[r][c]))
        if abs(m[p][c]) < 1e-300:
            raise ZeroDivisionError("singular matrix")
        m[c], m[p] = m[p], m[c]
        piv = m[c][c]
        m[c] = [x / piv for x in m[c]]
        for r in range(n):
            if r != c and m[r][c]:
                f = m[r][c]
                m[r] = [x - f * y for x, y in zip(m[r], m[c])]
    return [row[n:] for row in m]


def _no_finite_maximum(names: list[str], t: dict) -> str | None:
    """Why the likelihood has no finite maximum (None when it has one): the graph "i took a
    point from j" must be strongly connected."""
    def reach(start: str, edge) -> set[str]:
        seen, todo = {start}, [start]
        while todo:
            i = todo.pop()
            for j in names:
                if j not in seen and edge(i, j):
                    seen.add(j)
                    todo.append(j)
        return seen
    took = lambda i, j: t.get((i, j), [0.0])[0] > 0  # noqa: E731
    ahead = reach(names[0], took)
    behind = reach(names[0], lambda i, j: took(j, i))
    if len(ahead) == len(behind) == len(names):
        return None
    for m in names:
        met = [o for o in names if (m, o) in t]
        if met and all(not took(o, m) for o in met):
            return f"{m} won every vote it was in: its score is not finite"
        if met and all(not took(m, o) for o in met):
            return f"{m} lost every vote it was in: its score is not finite"
    if not all(any((m, o) in t for o in names) for m in names):
        return "a model has no votes yet"
    group = sorted(ahead if len(ahead) < len(names) else set(names) - behind)
    return (f"{', '.join(group)} and the other models never met, or one side took no point from the other: "
            "no finite scores")


def _p(d: float) -> float:
    """1 / (1 + exp(-d)) without overflow: the probability that a model d log-odds ahead wins."""
    return 1 / (1 + math.exp(-d)) if d >= 0 else math.exp(d) / (1 + math.exp(d))


def _fit(names: list[str], t: dict, tol: float, max_iter: int) -> tuple[list[float], list[list[float]], int]:
    """Newton's method on the centred log-scores -> (scores, Fisher information, iterations)."""
    M = len(names)
    W = [[t.get((i, j), [0.0])[0] for j in names] for i in names]
    N = [[W[a][b] + W[b][a] for b in range(M)] for a in range(M)]

    def loglik(s):
        return sum(W[i][j] * math.log(max(_p(s[i] - s[j]), 1e-300)) for i in range(M) for j in range(M) if W[i][j])

    def info(s):
        out = [[0.0] * M for _ in range(M)]
        for i in range(M):
            for j in range(M):
                if i != j and N[i][j]:
                    p = _p(s[i] - s[j])
                    out[i][j] = -N[i][j] * p * (1 - p)
                    out[i][i] += N[i][j] * p * (1 - p)
        return out

    s = [0.0] * M
    for it in range(1, max_iter + 1):
        grad = [sum(W[i][j] - N[i][j] * _p(s[i] - s[j]) for j in range(M) if j != i) for i in range(M)]
        inv = _inverse([[x + 1 / M for x in row] for row in info(s)])  # (I + 11'/M)^-1 g = I+ g, as g is centred
        step = [sum(inv[i][j] * grad[j] for j in range(M)) for i in range(M)]
        now, frac = loglik(s), 1.0
        while frac > 1e-6 and loglik([x + frac * d for x, d in zip(s, step)]) < now - 1e-12:
            frac /= 2
        s = [x + frac * d for x, d in zip(s, step)]
        mean = sum(s) / M
        s = [x - mean for x in s]
        if max(abs(frac * d) for d in step) < tol:
            break
    return s, info(s), it


def bradley_terry(votes: list[dict], order: list[str] | None = None, anchor: str | None = None, z: float = Z95,
                  tol: float = 1e-12, max_iter: int = 100) -> dict:
    """Bradley-Terry scores of the models that have votes (module doc): centred (sum 0), or
    with `anchor` the anchor model's score is 0 (and its se 0). -> {"scale", "centred", "anchor",
    "models": [{"model", "votes", "score", "se", "lo", "hi"}], "finite", "why", "iterations"}."""
    names, t = _tally(votes, order)
    names = [m for m in names if any(k[0] == m for k in t)]
    if anchor is not None and anchor not in names:
        raise ValueError(f"anchor {anchor!r} is not a model with votes ({', '.join(names) or 'none'})")
    n_votes = {m: sum(sum(r[1:]) for k, r in t.items() if k[0] == m) for m in names}
    out = {"scale": SCALE, "centred": anchor is None, "anchor": anchor, "finite": False, "iterations": 0,
           "why": None if len(names) >= 2 else "fewer than two models have votes",
           "models": [{"model": m, "votes": n_votes[m], "score": None, "se": None, "lo": None, "hi": None} for m in names]}
    if len(names) < 2 or (why := _no_finite_maximum(names, t)):
        out["why"] = out["why"] or why
        return out
    s, info, iterations = _fit(names, t, tol, max_iter)
    M = len(names)
    cov = [[x - 1 / M for x in row] for row in _inverse([[x + 1 / M for x in row] for row in info])]
    k = names.index(anchor) if anchor is not None else None
    for i, row in enumerate(out["models"]):
        if k is None:
            score, var = s[i], cov[i][i]
        else:  # the contrast s_i - s_anchor, whose variance any choice of centring gives alike
            score, var = s[i] - s[k], cov[i][i] + cov[k][k] - 2 * cov[i][k]
        se = math.sqrt(max(var, 0.0))
        row.update(score=score, se=se, lo=score - z * se, hi=score + z * se)
    out.update(finite=True, iterations=iterations)
    return out


def summary(votes: list[dict], order: list[str] | None = None) -> dict:
    """What the admin page shows: vote counts, the pairs' win rates, Bradley-Terry scores."""
    counts = {v: sum(x["vote"] == v for x in votes) for v in POINTS}
    return {"votes": len(votes), "counts": counts, "pairs": pair_table(votes, order), "bradley_terry": bradley_terry(votes, order)}
