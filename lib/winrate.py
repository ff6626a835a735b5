"""
Win rates, InstructGPT's headline metric (Figure 1): how often a judge prefers policy A's response
to policy B's on the same prompts, ties counting half, and the Wilson interval around it. Used by
evaluate.py, by ppo.py's in-training evaluation against SFT and by the lab's evaluation.
"""
import math


def win_rate(scores_a, scores_b):
    """Pairwise comparison of A and B on the same prompts: a higher score wins, equal scores tie and
    count half (win_rate = (wins + ties / 2) / n)."""
    if len(scores_a) != len(scores_b) or len(scores_a) == 0:
        raise ValueError("need one score of A and of B per prompt")
    wins = sum(a > b for a, b in zip(scores_a, scores_b))
    ties = sum(a == b for a, b in zip(scores_a, scores_b))
    n = len(scores_a)
    return {"win_rate": (wins + ties / 2) / n, "wins": wins, "ties": ties,
            "losses": n - wins - ties, "n": n}


def wilson_interval(successes, n, z=1.96):
    """Wilson score interval of a proportion successes / n (z = 1.96: 95%). Unlike
    p +- z sqrt(p(1-p)/n) it stays inside [0, 1] and is not of zero width at p = 0 or 1.
    `successes` may be fractional (wins + ties/2).

        center = (p + z^2 / 2n) / (1 + z^2 / n)
        half = z / (1 + z^2 / n) * sqrt(p (1 - p) / n + z^2 / 4n^2)"""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(max(p * (1 - p) / n + z * z / (4 * n * n), 0.0))
    return max(center - half, 0.0), min(center + half, 1.0)

