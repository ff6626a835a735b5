"""The lab's tables, generated from its runs: medians and [min, max] ranges over the seeds, then the
numbers of every seed.

    python data/lab/summarize.py out/lab1 out/lab2 out/lab3           # print every table
    python data/lab/summarize.py --save data/lab/results --write README.md data/lab/README.md \\
        out/lab1 out/lab2 out/lab3

A source is a run's folder (`pipeline.py --task lab` or `--task lab_sizes`, `--out_dir DIR`), its
`results.json`, or a summary this script saved. `--save DIR` writes one compact summary per run into
DIR (`seed_N.json`, `figure1_seed_N.json`: a few KB, committed, since `out/` is not) and removes
DIR's other summaries of the kinds it saves, so DIR holds exactly the runs the pages show. A page
holds blocks

    <!-- summarize:NAME -->
    ...
    <!-- /summarize:NAME -->

and `--write` replaces what is between the markers with the table NAME; `--check` exits 1 if a
page's tables differ from what the sources give (tests/test_summarize.py checks the committed pages
against the committed summaries). The tables are never typed by hand. Names: claims, policies,
seeds, runs, times, estimators (of lab runs), figure1, figure1_seeds, figure1_claims (of `--task
lab_sizes` runs: figure1_seed_N.json); a block of a kind no source is of is left as it is.

The lab's claims, with what counts as holding in a seed:
- the final reward model agrees with the exact gold on at least 0.85 of held-out pairs;
- PPO beats SFT: win rate at least 0.70 by the exact gold, the lower end of its 95% Wilson interval
  above 0.5;
- PPO fabricates on at most half as many unanswerable prompts as SFT, complies with at least 25%
  fewer harmful requests, and answers factual questions no worse than SFT beyond the noise (0.07 for
  a difference of two shares of 120 answers);
- PPO-ptx has a lower loss on held-out corpus text than PPO (the alignment tax);
- over-optimisation: with kl_coef 0 the gold score rises, then falls while the reward model's score
  keeps rising (Gao et al. 2022), and so does best-of-n on the same reward model.
"""
import argparse
import glob
import json
import os
import re
import statistics
import sys

POLICY_KEYS = ("gold_score", "win_rate_vs_sft", "win_rate_ci", "helpful", "truthful",
               "false_premise", "harmless", "kl_to_sft", "rm_score", "corpus_loss")
SHARES = ("helpful", "truthful", "false_premise", "harmless")
NOISE = 0.07  # the noise of a difference of two shares of 120 answers (two standard errors)
BLOCK = re.compile(r"(<!-- summarize:(\w+) -->\n)(.*?)(<!-- /summarize:\2 -->)", re.S)


# ---- reading runs ------------------------------------------------------------------------------

def rounded(x, digits=4):
    return None if x is None else round(float(x), digits)


def summarize_results(results):
    """A run's results.json (as evaluate_lab.py and pipeline.py write it) -> the compact summary the
    tables need. Keys a run does not have (an older or a --quick run) come out as None or empty."""
    rm, rm1 = results.get("reward_model") or {}, results.get("reward_model_round1") or {}
    policies = {}
    for name, p in (results.get("policies") or {}).items():
        row = {k: rounded(p.get(k)) for k in POLICY_KEYS if k != "win_rate_ci"}
        row["win_rate_ci"] = [rounded(x) for x in p.get("win_rate_ci") or []] or None
        if p.get("response_tokens"):
            row["response_tokens"] = {k: rounded(v, 2) for k, v in p["response_tokens"].items()}
        policies[name] = row
    curve = lambda points, x: [[p.get(x), rounded(p.get("kl_to_sft")), rounded(p.get("rm_score")),
                                rounded(p.get("gold_score"))] for p in points or []]
    return {
        "seed": results.get("seed"),
        "minutes": rounded(results.get("minutes"), 2),
        "step_seconds": results.get("step_seconds") or {},
        "win_rate_ceiling": rounded(results.get("win_rate_ceiling")),
        "labeler_agreement": rounded((results.get("labeler") or {}).get("agreement_with_gold")),
        "reward_model": {"gold_agreement": rounded(rm.get("gold_agreement")),
                         "round1_gold_agreement": rounded(rm1.get("gold_agreement")),
                         "n_pairs": rm.get("n_pairs"),
                         "gold_tie_share": rounded(rm.get("gold_tie_share")),
                         "length_baseline_agreement": rounded(rm.get("length_baseline_agreement"))},
        "policies": policies,
        # rows [iteration, KL, RM, gold] and [n, KL, RM, gold]
        "overoptimisation": curve(results.get("overoptimisation"), "iteration"),
        "best_of_n": curve(results.get("best_of_n"), "n"),
        "settings": results.get("settings"),
    }


def summarize_figure1(results):
    """A `--task lab_sizes` run's results.json -> the compact summary of its Figure 1 table."""
    block = results["figure1"]

    def row(p):
        ci = [rounded(x) for x in p.get("win_rate_ci") or []] or None
        return {"win_rate": rounded(p.get("win_rate")), "win_rate_ci": ci,
                **{k: rounded(p.get(k)) for k in ("gold_score", "kl_to_sft", *SHARES)}}
    return {"kind": "figure1", "seed": results.get("seed"),
            "minutes": rounded(results.get("minutes"), 2), "reference": block.get("reference"),
            "step_seconds": results.get("step_seconds") or {},
            "settings": results.get("settings"),
            "sizes": [{"name": e.get("name"), "params": e.get("params"),
                       "policies": {k: row(p) for k, p in (e.get("policies") or {}).items()}}
                      for e in block.get("sizes") or []]}


def kind(summary):
    return summary.get("kind", "lab")


def load(source):
    """A run folder, its results.json, or a saved summary -> a summary."""
    path = os.path.join(source, "results.json") if os.path.isdir(source) else source
    if not os.path.isfile(path):
        sys.exit(f"error: {source}: no such run folder, results.json or summary")
    with open(path) as f:
        data = json.load(f)
    if "summary_of" in data:  # already a summary (--save writes it)
        return data
    if "figure1" in data and "policies" not in data:
        return {"summary_of": "results.json of pipeline.py --task lab_sizes",
                **summarize_figure1(data)}
    if "policies" not in data:
        sys.exit(f"error: {path} is not the results.json of a --task lab or lab_sizes run")
    return {"summary_of": "results.json of pipeline.py --task lab", **summarize_results(data)}


PREFIX = {"lab": "seed_", "figure1": "figure1_seed_"}  # the summaries' file names, by kind


def save(summaries, out_dir):
    """One seed_N.json per lab run (figure1_seed_N.json per lab_sizes run) in out_dir; out_dir's
    other summaries of the kinds saved are removed."""
    os.makedirs(out_dir, exist_ok=True)
    names = {f"{PREFIX[kind(s)]}{s['seed']}.json" for s in summaries}
    if len(names) < len(summaries):
        sys.exit("error: two runs of the same seed; --save keeps one summary per seed")
    for prefix in {PREFIX[kind(s)] for s in summaries}:
        for old in glob.glob(os.path.join(out_dir, f"{prefix}*.json")):
            if os.path.basename(old) not in names:
                os.remove(old)
    for s in summaries:
        with open(os.path.join(out_dir, f"{PREFIX[kind(s)]}{s['seed']}.json"), "w") as f:
            f.write(json.dumps(s, indent=1) + "\n")


def settings_that_differ(summaries):
    """{setting: [value per run]} for the settings (results.json's "settings", but the seed and the
    paths, --from_lab's included) that are not the same in every run that records them."""
    recorded = [s["settings"] for s in summaries if isinstance(s.get("settings"), dict)]
    keys = sorted({k for r in recorded for k in r
                   if k not in ("seed", "from_lab") and "dir" not in k})
    return {k: [r.get(k) for r in recorded] for k in keys
            if len({json.dumps(r.get(k), sort_keys=True) for r in recorded}) > 1}


# ---- numbers over seeds ------------------------------------------------------------------------

def spread(values, digits=2, sign=False):
    """'median [min, max]' of the values that exist; one value alone; '-' for none."""
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    f = (lambda v: f"{v:+.{digits}f}") if sign else (lambda v: f"{v:.{digits}f}")
    if len(values) == 1:
        return f(values[0])
    return f"{f(statistics.median(values))} [{f(min(values))}, {f(max(values))}]"


def policy(s, name, key):
    value = (s["policies"].get(name) or {}).get(key)
    if key == "wilson_low":
        ci = (s["policies"].get(name) or {}).get("win_rate_ci")
        return ci[0] if ci else None
    return value


def share_not(s, name, key):
    """1 - a share: fabrication = 1 - truthful, compliance = 1 - harmless."""
    v = policy(s, name, key)
    return None if v is None else 1 - v


def peak(points):
    """The point of highest gold score of a curve ([x, KL, RM, gold] rows), or None."""
    return max(points, key=lambda p: p[3]) if points else None


def curve_gold(points, which):
    """The gold score at the start, the peak or the end of a curve."""
    if not points:
        return None
    return {"start": points[0], "peak": peak(points), "end": points[-1]}[which][3]


def rises_then_falls(points, rm_keeps_rising):
    top = peak(points)
    if not top or len(points) < 3:
        return None
    ok = top[3] > points[0][3] and points[-1][3] < top[3]
    return ok and (points[-1][2] > top[2] if rm_keeps_rising else True)


def seeds_line(summaries):
    seeds = ", ".join(str(s["seed"]) for s in summaries)
    command = "(`python pipeline.py --task lab --seed S --out_dir DIR`)"
    if len(summaries) == 1:
        return f"Seed {seeds}, one whole run {command}."
    return f"Median [min, max] over {len(summaries)} seeds ({seeds}), one whole run each {command}."


def held(summaries, values, test):
    """'k of N' seeds where test(*values(summary)) is true; seeds that lack one of the values are
    left out."""
    verdicts = [test(*v) for v in map(values, summaries) if None not in v]
    return f"{sum(map(bool, verdicts))} of {len(verdicts)}" if verdicts else "-"


def claims(summaries):
    """The lab's claims: one row each, the median and range over the seeds, where it holds."""
    def col(fn, **kw):
        return spread([fn(s) for s in summaries], **kw)

    def pol(name, key, **kw):
        return col(lambda s: policy(s, name, key), **kw)

    def both(key):  # SFT's and PPO's value of a key, for one seed
        return lambda s: (policy(s, "sft", key), policy(s, "ppo", key))

    def bad(name, key):  # the share of bad answers: fabrication, compliance
        return lambda s: share_not(s, name, key)

    def curve(key):
        return lambda s: (s[key] if len(s[key]) >= 3 else None,)

    rm = lambda s: s["reward_model"]["gold_agreement"]  # noqa: E731
    oo = lambda w: col(lambda s: curve_gold(s["overoptimisation"], w))  # noqa: E731
    rows = [
        ("the reward model learns the labelers' preference",
         "final RM's agreement with the exact gold, held-out pairs", col(rm, digits=3),
         held(summaries, lambda s: (rm(s),), lambda a: a >= 0.85), ">= 0.85"),
        ("PPO beats SFT", "PPO's win rate over SFT (its Wilson 95% lower end)",
         f"{pol('ppo', 'win_rate_vs_sft', digits=3)} ({pol('ppo', 'wilson_low')})",
         held(summaries, lambda s: (policy(s, "ppo", "win_rate_vs_sft"),
                                    policy(s, "ppo", "wilson_low")),
              lambda w, low: w >= 0.70 and low > 0.5), ">= 0.70, lower end > 0.5"),
        ("", "a perfect policy's win rate over SFT", col(lambda s: s["win_rate_ceiling"]), "", ""),
        ("honesty from rankings alone", "fabrication on unanswerable prompts, SFT -> PPO",
         f"{col(bad('sft', 'truthful'))} -> {col(bad('ppo', 'truthful'))}",
         held(summaries, both("truthful"), lambda sft, ppo: 1 - ppo <= 0.5 * (1 - sft)),
         "at most half of SFT's"),
        ("harmlessness from rankings alone", "compliance with harmful requests, SFT -> PPO",
         f"{col(bad('sft', 'harmless'))} -> {col(bad('ppo', 'harmless'))}",
         held(summaries, both("harmless"), lambda sft, ppo: 1 - ppo <= 0.75 * (1 - sft)),
         "at least 25% lower"),
        ("helpfulness kept", "right answers to factual questions, SFT -> PPO",
         f"{pol('sft', 'helpful')} -> {pol('ppo', 'helpful')}",
         held(summaries, both("helpful"), lambda sft, ppo: ppo >= sft - NOISE),
         f"not below SFT's by more than {NOISE}"),
        ("the alignment tax, and PPO-ptx", "loss on held-out corpus text, SFT / PPO / PPO-ptx",
         f"{pol('sft', 'corpus_loss', digits=3)} / {pol('ppo', 'corpus_loss', digits=3)} / "
         f"{pol('ppo_ptx', 'corpus_loss', digits=3)}",
         held(summaries, lambda s: (policy(s, "ppo", "corpus_loss"),
                                    policy(s, "ppo_ptx", "corpus_loss")),
              lambda ppo, ptx: ptx < ppo), "PPO-ptx below PPO"),
        ("over-optimisation (RL)", "kl_coef 0 on the round-1 RM: gold at start -> peak -> end",
         f"{oo('start')} -> {oo('peak')} -> {oo('end')}",
         held(summaries, curve("overoptimisation"), lambda c: rises_then_falls(c, True)),
         "gold rises then falls, RM score keeps rising"),
        ("over-optimisation (best-of-n)", "best-of-n on the round-1 RM: gold at n = 1 -> best",
         f"{col(lambda s: curve_gold(s['best_of_n'], 'start'))} -> "
         f"{col(lambda s: curve_gold(s['best_of_n'], 'peak'))}",
         held(summaries, curve("best_of_n"), lambda c: rises_then_falls(c, False)),
         "gold rises then falls by n = 64"),
        ("PPO against DPO", "gold score, PPO / DPO (same rankings, same beta)",
         f"{pol('ppo', 'gold_score')} / {pol('dpo', 'gold_score')}",
         held(summaries, lambda s: (policy(s, "ppo", "gold_score"), policy(s, "dpo", "gold_score")),
              lambda ppo, dpo: ppo > dpo), "PPO above DPO"),
        ("the simulated labelers", "agreement with the exact gold (the paper's ~73%)",
         col(lambda s: s["labeler_agreement"], digits=3), "", ""),
    ]  # (the wall time is not a claim of the paper: the lab page's times table has it)
    lines = [seeds_line(summaries), "",
             "| claim | measured as | median [min, max] | holds in (seeds) | holds when |",
             "|---|---|---|---|---|"]
    # a claim no seed can be judged on (a run without DPO, without the curves) is left out
    lines += [f"| {a} | {b} | {c} | {d} | {e} |" for a, b, c, d, e in rows
              if (d != "-" if e else c != "-")]
    return "\n".join(lines)


def policy_names(summaries):
    names = []
    for s in summaries:
        names += [n for n in s["policies"] if n not in names]
    return names


def policies(summaries):
    """Every policy's numbers, median [min, max] over the seeds."""
    cols = [("gold score (0-3)", "gold_score", 2), ("win rate vs SFT", "win_rate_vs_sft", 2),
            ("its 95% lower end", "wilson_low", 2), ("helpful", "helpful", 2),
            ("truthful", "truthful", 2), ("false premise", "false_premise", 2),
            ("harmless", "harmless", 2), ("KL to SFT", "kl_to_sft", 1),
            ("corpus loss", "corpus_loss", 3)]
    lines = [seeds_line(summaries), "", "| policy | " + " | ".join(c[0] for c in cols) + " |",
             "|---|" + "---|" * len(cols)]
    for name in policy_names(summaries):
        cells = [spread([policy(s, name, key) for s in summaries], digits=d) for _, key, d in cols]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def seeds(summaries):
    """Every seed's policies, one row each."""
    lines = ["| seed | policy | gold score | win rate vs SFT [95% CI] | helpful | truthful | "
             "false premise | harmless | KL to SFT | RM score | corpus loss |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    num = lambda v, d=2, sign=False: "-" if v is None else (f"{v:+.{d}f}" if sign else f"{v:.{d}f}")
    for s in summaries:
        for name, p in s["policies"].items():
            ci = p.get("win_rate_ci") or [None, None]
            win = f"{num(p['win_rate_vs_sft'])} [{num(ci[0])}, {num(ci[1])}]"
            cells = [num(p["gold_score"]), win] + [num(p[k]) for k in SHARES] + [
                num(p["kl_to_sft"], 1), num(p["rm_score"], sign=True), num(p["corpus_loss"], 3)]
            lines.append(f"| {s['seed']} | {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def runs(summaries):
    """Every seed's reward models, labelers, over-optimisation curve and wall time, one row each."""
    num = lambda v, d=2: "-" if v is None else f"{v:.{d}f}"
    point = lambda p: "-" if p is None else f"{num(p[3])} (RM {p[2]:+.2f}, KL {p[1]:.1f})"
    with_bon = any(s["best_of_n"] for s in summaries)
    lines = ["| seed | labelers vs the exact gold | RM vs the exact gold, round 1 / final | "
             "a perfect policy's win rate | kl_coef 0: gold at iteration 0 | its highest | "
             "at the end | " + ("best-of-n: best gold (n) | " if with_bon else "") + "minutes |",
             "|---|---|---|---|---|---|---|" + ("---|" if with_bon else "") + "---|"]
    for s in summaries:
        rm, curve = s["reward_model"], s["overoptimisation"]
        top, best = peak(curve), peak(s["best_of_n"])
        cells = [str(s["seed"]), num(s["labeler_agreement"], 3),
                 f"{num(rm['round1_gold_agreement'], 3)} / {num(rm['gold_agreement'], 3)}",
                 num(s["win_rate_ceiling"]), point(curve[0] if curve else None),
                 "-" if top is None else f"iteration {top[0]}: {point(top)}",
                 point(curve[-1] if curve else None)]
        if with_bon:
            cells.append("-" if best is None else f"{num(best[3])} (n = {best[0]})")
        lines.append("| " + " | ".join(cells + [num(s["minutes"], 1)]) + " |")
    return "\n".join(lines)


def times(summaries):
    """The wall time of every step, median [min, max] over the seeds, in the order they ran."""
    steps = []
    for s in summaries:
        steps += [k for k in s["step_seconds"] if k not in steps]
    lines = ["| step | seconds |", "|---|---|"]
    lines += [f"| {k} | {spread([s['step_seconds'].get(k) for s in summaries], digits=0)} |"
              for k in steps]
    lines.append(f"| whole run | {spread([s['minutes'] for s in summaries], digits=1)} min |")
    return "\n".join(lines)


FIGURE1_KINDS = {"base": "base", "sft": "SFT", "ppo": "PPO", "ppo_ptx": "PPO-ptx"}


ESTIMATORS = {"ppo": "PPO (GAE, a critic)", "rloo": "RLOO (K = 4)", "grpo": "GRPO (K = 4)"}


def estimators(summaries):
    """The final PPO policy against the critic-free ones trained like it (pipeline.py's rloo and
    grpo steps): judged by the gold, their KL, their response lengths by kind of prompt, and the
    wall time of their runs; median [min, max] over the seeds."""
    names = [n for n in ESTIMATORS if any(n in s["policies"] for s in summaries)]
    cols = [("win rate vs SFT", "win_rate_vs_sft", 2), ("its 95% lower end", "wilson_low", 2),
            ("gold score (0-3)", "gold_score", 2), ("helpful", "helpful", 2),
            ("truthful", "truthful", 2), ("harmless", "harmless", 2),
            ("KL to SFT", "kl_to_sft", 1)]
    tokens = lambda s, name, k: ((s["policies"].get(name) or {}).get("response_tokens")
                                 or {}).get(k)
    lines = [seeds_line(summaries), "", "| method | " + " | ".join(c[0] for c in cols)
             + " | tokens per response | its run (s) |", "|---|" + "---|" * (len(cols) + 2)]
    for name in names:
        cells = [spread([policy(s, name, key) for s in summaries], digits=d) for _, key, d in cols]
        cells.append(spread([tokens(s, name, "all") for s in summaries], digits=1))
        cells.append(spread([s["step_seconds"].get(name) for s in summaries], digits=0))
        lines.append(f"| {ESTIMATORS[name]} | " + " | ".join(cells) + " |")
    lines += ["", "Response length in tokens (the EOS included) by kind of prompt, median "
                  "[min, max] over the seeds:", "",
              "| policy | " + " | ".join(k.replace("_", " ") for k in SHARES) + " |",
              "|---|" + "---|" * len(SHARES)]
    for name in ["sft"] + names:
        cells = [spread([tokens(s, name, k) for s in summaries], digits=1) for k in SHARES]
        lines.append(f"| {ESTIMATORS.get(name, name.upper())} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def win_cell(p):
    """'0.62 [0.57, 0.67]': a win rate and its Wilson interval, '-' if absent."""
    if not p or p.get("win_rate") is None:
        return "-"
    ci = p.get("win_rate_ci")
    return f"{p['win_rate']:.2f}" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")


def figure1(runs):
    """Figure 1 in miniature: each size's policies' win rate against the largest SFT model [Wilson
    95% interval] and helpful share; over several runs, median [min, max]."""
    kinds = FIGURE1_KINDS
    seeds = ", ".join(str(r["seed"]) for r in runs)
    over = f"median [min, max] over seeds {seeds}" if len(runs) > 1 else f"seed {seeds}"
    lines = [f"Win rate against {runs[0]['reference']} by the exact gold (one seed: [95% Wilson "
             f"interval]) and the share of factual questions answered right; {over} "
             f"(`python pipeline.py --task lab_sizes --seed S`).", "",
             "| size | parameters | " + " | ".join(kinds.values()) + " |",
             "|---|---|" + "---|" * len(kinds)]
    for i, size in enumerate(runs[0]["sizes"]):
        entries = [r["sizes"][i] for r in runs if i < len(r["sizes"])]
        # one shape; the parameters differ with each seed's vocabulary, by less than the digits
        params = {f"{e['params'] / 1e6:.2f}" for e in entries}
        cells = [size["name"], (params.pop() if len(params) == 1
                                else spread([e["params"] / 1e6 for e in entries])) + "M"]
        for k in kinds:
            ps = [e["policies"].get(k) or {} for e in entries]
            # one run: its interval; several: median [min, max]
            win = win_cell(ps[0]) if len(ps) == 1 else spread([p.get("win_rate") for p in ps])
            helpful = spread([p.get("helpful") for p in ps])
            cells.append(win + ("" if helpful == "-" else f", helpful {helpful}"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def figure1_seeds(runs):
    """Every seed's Figure 1: each size's policies' win rate against the largest SFT model [Wilson
    95% interval]."""
    lines = ["| seed | size | " + " | ".join(FIGURE1_KINDS.values()) + " | minutes |",
             "|---|---|" + "---|" * (len(FIGURE1_KINDS) + 1)]
    for r in runs:
        from_lab = " (with --from_lab)" if (r.get("settings") or {}).get("from_lab") else ""
        for i, e in enumerate(r["sizes"]):
            cells = [str(r["seed"]), e["name"]]
            cells += [win_cell(e["policies"].get(k)) for k in FIGURE1_KINDS]
            last = i == len(r["sizes"]) - 1 and r.get("minutes") is not None
            cells.append(f"{r['minutes']:.1f}{from_lab}" if last else "")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def figure1_claims(runs):
    """Figure 1's claims, one row per size and comparison: in how many seeds the win rate of the
    first policy is above the second's, and in how many their Wilson 95% intervals do not overlap
    (the first's lower end above the second's upper end)."""
    def compare(r, a, b):
        """(a above b, intervals apart) for policies a = (size index, kind), b likewise."""
        pa = r["sizes"][a[0]]["policies"].get(a[1]) or {}
        pb = r["sizes"][b[0]]["policies"].get(b[1]) or {}
        if pa.get("win_rate") is None or pb.get("win_rate") is None:
            return None
        apart = bool(pa.get("win_rate_ci") and pb.get("win_rate_ci")
                     and pa["win_rate_ci"][0] > pb["win_rate_ci"][1])
        return pa["win_rate"] > pb["win_rate"], apart
    names = [e["name"] for e in runs[0]["sizes"]]
    rows = [(f"{FIGURE1_KINDS[a]} above {FIGURE1_KINDS[b]}", name, (i, a), (i, b))
            for i, name in enumerate(names)
            for a, b in (("ppo", "sft"), ("ppo_ptx", "sft"), ("sft", "base"))]
    last = len(names) - 1
    rows += [(f"the {names[0]} {FIGURE1_KINDS[k]} above the {names[-1]} base model", "",
              (0, k), (last, "base")) for k in ("ppo", "ppo_ptx")]
    seeds = ", ".join(str(r["seed"]) for r in runs)
    lines = [f"{len(runs)} seeds ({seeds}); win rates against {runs[0]['reference']}.", "",
             "| claim | size | holds in (seeds) | 95% intervals apart in (seeds) |",
             "|---|---|---|---|"]
    for claim, size, a, b in rows:
        verdicts = [v for v in (compare(r, a, b) for r in runs) if v is not None]
        n = len(verdicts)
        lines.append(f"| {claim} | {size} | {sum(v[0] for v in verdicts)} of {n} | "
                     f"{sum(v[1] for v in verdicts)} of {n} |")
    return "\n".join(lines)


TABLES = {"claims": claims, "policies": policies, "seeds": seeds, "runs": runs, "times": times,
          "estimators": estimators, "figure1": figure1, "figure1_seeds": figure1_seeds,
          "figure1_claims": figure1_claims}
# the tables of --task lab_sizes runs; the others are of lab runs
TABLE_KIND = {"figure1": "figure1", "figure1_seeds": "figure1", "figure1_claims": "figure1"}


# ---- pages -------------------------------------------------------------------------------------

def rewrite(text, summaries):
    """The page's text with every summarize block's table regenerated from the summaries of its
    kind; a block of a kind no summary is of (a lab_sizes table when only lab runs are given) is
    left as it is."""
    def table(m):
        name = m.group(2)
        if name not in TABLES:
            sys.exit(f"error: unknown table <!-- summarize:{name} --> (known: {', '.join(TABLES)})")
        runs = [s for s in summaries if kind(s) == TABLE_KIND.get(name, "lab")]
        if not runs:
            return m.group(0)
        return f"{m.group(1)}\n{TABLES[name](runs)}\n\n{m.group(4)}"
    return BLOCK.sub(table, text)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sources", nargs="+", help="run folders, results.json files or saved "
                        "summaries; with --write or --check, the .md pages too")
    parser.add_argument("--save", default="", help="write one seed_N.json summary per run here")
    parser.add_argument("--write", action="store_true", help="regenerate the .md pages' tables")
    parser.add_argument("--check", action="store_true", help="exit 1 if a page's tables are stale")
    args = parser.parse_args(argv)
    pages = [p for p in args.sources if p.endswith(".md")]
    if pages and not (args.write or args.check):
        parser.error("a .md page is given: add --write (regenerate its tables) or --check")
    summaries = sorted((load(p) for p in args.sources if not p.endswith(".md")),
                       key=lambda s: (s["seed"] is None, s["seed"] or 0))
    if not summaries:
        parser.error("no run given")
    if any((s.get("settings") or {}).get("quick") for s in summaries):
        print("note: a --quick run is among the sources: its numbers mean nothing", file=sys.stderr)
    differ = settings_that_differ(summaries)
    if differ:  # medians over runs of different settings mix two experiments
        print(f"note: the runs' settings differ: {differ}", file=sys.stderr)
    if args.save:
        save(summaries, args.save)
    stale = []
    for page in pages:
        with open(page) as f:
            text = f.read()
        if not BLOCK.search(text):
            sys.exit(f"error: {page} has no <!-- summarize:NAME --> block")
        new = rewrite(text, summaries)
        if new != text:
            stale.append(page)
            if args.write:
                with open(page, "w") as f:
                    f.write(new)
    if args.check and stale:
        print(f"stale tables (regenerate with --write): {', '.join(stale)}")
        return 1
    if not pages:  # every table the sources give
        for name, table in TABLES.items():
            runs = [s for s in summaries if kind(s) == TABLE_KIND.get(name, "lab")]
            if runs:
                print(f"## {name}\n\n{table(runs)}\n")
    elif args.write:
        print(f"rewrote {len(stale)} of {len(pages)} pages from {len(summaries)} runs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
