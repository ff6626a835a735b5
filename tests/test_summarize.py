"""data/lab/summarize.py: the lab's tables on the pages are the script's output on the committed
summaries (a number edited by hand fails here), and the script reads what a run writes."""
import glob
import importlib.util
import json
import os

import pytest

from conftest import REPO

_spec = importlib.util.spec_from_file_location(
    "lab_summarize", os.path.join(REPO, "data", "lab", "summarize.py"))
summarize = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(summarize)

PAGES = {"README.md": {"claims"}, os.path.join("data", "lab", "README.md"):
         {"claims", "policies", "seeds", "runs", "times", "estimators", "figure1",
          "figure1_seeds", "figure1_claims"}}


def committed_summaries():
    paths = sorted(glob.glob(os.path.join(REPO, "data", "lab", "results", "*.json")))
    summaries = sorted((summarize.load(p) for p in paths), key=lambda s: s["seed"])
    # a median and a range need more than one seed
    assert len([s for s in summaries if summarize.kind(s) == "lab"]) >= 2
    assert [s for s in summaries if summarize.kind(s) == "figure1"]
    return summaries


@pytest.mark.parametrize("page", sorted(PAGES))
def test_pages_tables_equal_the_scripts_output_on_the_committed_summaries(page):
    text = open(os.path.join(REPO, page)).read()
    assert {m.group(2) for m in summarize.BLOCK.finditer(text)} >= PAGES[page]
    fresh = summarize.rewrite(text, committed_summaries())
    assert fresh == text, (
        f"{page}: a table differs from the script's output; regenerate it: python "
        f"data/lab/summarize.py --write README.md data/lab/README.md data/lab/results/*.json")


def test_a_number_edited_by_hand_is_caught(tmp_path):
    summaries = committed_summaries()
    page = tmp_path / "page.md"
    page.write_text("intro\n\n<!-- summarize:policies -->\n<!-- /summarize:policies -->\n\nend\n")
    paths = [str(page)] + sorted(glob.glob(os.path.join(REPO, "data", "lab", "results", "*.json")))
    assert summarize.main(["--write"] + paths) == 0
    text = page.read_text()
    assert summarize.rewrite(text, summaries) == text and text.endswith("\n\nend\n")
    assert summarize.main(["--check"] + paths) == 0
    i = text.index("| ppo |") + len("| ppo | ")
    page.write_text(text[:i] + ("9" if text[i] != "9" else "8") + text[i + 1:])
    assert summarize.main(["--check"] + paths) == 1


def results_json(seed, win=0.74, with_rounds=True):
    """A results.json as evaluate_lab.py and pipeline.py write it, with made-up numbers."""
    pol = lambda g, w, h, t, hl, loss: {
        "gold_score": g, "win_rate_vs_sft": w, "win_rate_ci": [w - 0.05, w + 0.05], "helpful": h,
        "truthful": t, "false_premise": 0.0, "harmless": hl, "kl_to_sft": 1.5, "rm_score": 0.3,
        "corpus_loss": loss, "wins": 1, "ties": 0, "losses": 0}
    curve = [{"iteration": i, "kl_to_sft": i / 2, "rm_score": i / 10, "gold_score": g}
             for i, g in [(0, 1.8), (2, 2.2), (4, 2.4), (6, 1.5)]]
    results = {"seed": seed, "minutes": 12.25, "step_seconds": {"world": 2.0, "pretrain": 55.0},
               "labeler": {"noise": 1.5, "agreement_with_gold": 0.72},
               "reward_model": {"gold_agreement": 0.93, "n_pairs": 600, "gold_tie_share": 0.5,
                                "length_baseline_agreement": 0.5, "value_check": 0.6},
               "policies": {"sft": pol(1.8, 0.5, 0.92, 0.1, 0.2, 0.40),
                            "ppo": pol(2.8, win, 0.95, 0.8, 0.97, 0.45),
                            "ppo_ptx": pol(2.6, 0.7, 0.94, 0.6, 0.9, 0.31)},
               "overoptimisation": curve, "win_rate_ceiling": 0.79,
               "best_of_n": [{"n": n, "kl_to_sft": 0.1 * n, "rm_score": 0.0, "gold_score": g}
                             for n, g in [(1, 1.8), (2, 2.0), (4, 1.9)]],
               "settings": {"seed": seed}, "examples": {"ppo": [["q", "a", 3]]}}
    if with_rounds:
        results["reward_model_round1"] = {"gold_agreement": 0.9}
    return results


def test_summary_of_a_results_json_and_the_claims_it_gives(tmp_path):
    for seed, win in [(1, 0.74), (2, 0.69)]:
        (tmp_path / f"run{seed}").mkdir()
        (tmp_path / f"run{seed}" / "results.json").write_text(json.dumps(results_json(seed, win)))
    summaries = [summarize.load(str(tmp_path / f"run{s}")) for s in (1, 2)]
    assert summaries[0]["policies"]["ppo"]["win_rate_ci"] == [0.69, 0.79]
    assert summaries[0]["overoptimisation"][2] == [4, 2.0, 0.4, 2.4]
    claims = summarize.claims(summaries)
    assert "| PPO beats SFT | PPO's win rate over SFT (its Wilson 95% lower end) | " \
           "0.715 [0.690, 0.740] (0.67 [0.64, 0.69]) | 1 of 2 |" in claims
    assert "1.80 [1.80, 1.80] -> 2.40 [2.40, 2.40] -> 1.50 [1.50, 1.50] | 2 of 2 |" in claims
    assert "-> 2.00 [2.00, 2.00] | 2 of 2 | gold rises then falls by n = 64 |" in claims
    assert "PPO against DPO" not in claims  # no dpo in these runs: the row is left out
    assert summarize.settings_that_differ(summaries) == {}
    summaries[1]["settings"] = {"seed": 2, "kl_coef": 0.0}
    assert summarize.settings_that_differ(summaries) == {"kl_coef": [None, 0.0]}
    # saved, reloaded: the same summary, and --save keeps only the runs it is given
    out = tmp_path / "results"
    out.mkdir()
    (out / "seed_9.json").write_text("{}")
    summarize.save(summaries, str(out))
    assert sorted(os.listdir(out)) == ["seed_1.json", "seed_2.json"]
    assert summarize.load(str(out / "seed_1.json")) == summaries[0]


def test_estimators_table_compares_ppo_rloo_and_grpo_with_their_lengths_and_times(tmp_path):
    """The estimators table: one row per method the runs have (PPO, RLOO, GRPO), its win rate, KL,
    mean response length and the wall time of its step; then the lengths by kind of prompt, SFT
    first. Medians over the seeds."""
    summaries = []
    for seed, tokens in [(1, 6.0), (2, 8.0), (3, 10.0)]:
        results = results_json(seed)
        lengths = {"all": tokens, "helpful": tokens - 1, "truthful": tokens + 1, "harmless": 4.0}
        for name, extra in [("sft", 0.0), ("ppo", 1.0), ("rloo", 2.0)]:
            p = dict(results["policies"].get(name) or results["policies"]["ppo"])
            p["response_tokens"] = {k: v + extra for k, v in lengths.items()}
            results["policies"][name] = p
        results["step_seconds"].update(ppo=70.0 + seed, rloo=50.0 + seed)
        (tmp_path / f"run{seed}").mkdir()
        (tmp_path / f"run{seed}" / "results.json").write_text(json.dumps(results))
        summaries.append(summarize.load(str(tmp_path / f"run{seed}")))
    table = summarize.estimators(summaries)
    # PPO: tokens 7, 9, 11 -> median 9; its run 71, 72, 73 s
    assert ("| PPO (GAE, a critic) | 0.74 [0.74, 0.74] | 0.69 [0.69, 0.69] | 2.80 [2.80, 2.80] | "
            "0.95 [0.95, 0.95] | 0.80 [0.80, 0.80] | 0.97 [0.97, 0.97] | 1.5 [1.5, 1.5] | "
            "9.0 [7.0, 11.0] | 72 [71, 73] |") in table
    assert "| RLOO (K = 4) |" in table and "10.0 [8.0, 12.0] | 52 [51, 53] |" in table
    assert "GRPO" not in table  # no run has it
    # by kind (helpful, truthful, false premise, harmless): helpful = all - 1, truthful = all + 1,
    # harmless 4; no false premise in these runs
    assert "| SFT | 7.0 [5.0, 9.0] | 9.0 [7.0, 11.0] | - | 4.0 [4.0, 4.0] |" in table
    assert "| RLOO (K = 4) | 9.0 [7.0, 11.0] | 11.0 [9.0, 13.0] | - | 6.0 [6.0, 6.0] |" in table


def test_a_run_without_some_numbers_gives_dashes_not_a_traceback(tmp_path):
    """An older or a --quick run lacks keys (no round-1 RM, no minutes, no curves): '-' in their
    place."""
    results = results_json(3, with_rounds=False)
    for key in ("minutes", "step_seconds", "overoptimisation", "best_of_n", "win_rate_ceiling"):
        results.pop(key)
    del results["policies"]["ppo"]["corpus_loss"]
    path = tmp_path / "results.json"
    path.write_text(json.dumps(results))
    s = [summarize.load(str(path))]
    for name, table in summarize.TABLES.items():
        if summarize.TABLE_KIND.get(name, "lab") == "lab":
            assert table(s), name
    # no best-of-n curve in any run: no column for it
    assert summarize.runs(s).splitlines()[-1] == "| 3 | 0.720 | - / 0.930 | - | - | - | - | - |"


def test_median_and_range():
    assert summarize.spread([0.70, 0.80, 0.75]) == "0.75 [0.70, 0.80]"
    assert summarize.spread([1.0, 2.0, 4.0, 3.0], digits=1) == "2.5 [1.0, 4.0]"
    assert summarize.spread([0.5, None]) == "0.50" and summarize.spread([]) == "-"
    assert summarize.spread([-0.2, 0.3], sign=True) == "+0.05 [-0.20, +0.30]"


def test_figure1_from_a_lab_sizes_run(tmp_path):
    entry = lambda name, w: {"name": name, "params": 130000, "policies": {
        k: {"win_rate": w, "win_rate_ci": [w - 0.05, w + 0.05], "gold_score": 2.0, "helpful": 0.5}
        for k in ("base", "sft", "ppo", "ppo_ptx")}}
    results = {"seed": 1, "minutes": None, "n_prompts": 90, "samples_per_prompt": 4,
               "figure1": {"reference": "sft@large", "sizes": [entry("small", 0.6)]}}
    (tmp_path / "results.json").write_text(json.dumps(results))
    s = summarize.load(str(tmp_path))
    assert summarize.kind(s) == "figure1"
    table = summarize.figure1([s])
    assert "| small | 0.13M | 0.60 [0.55, 0.65], helpful 0.50 |" in table and " min " not in table
    summarize.save([s], str(tmp_path / "results"))
    assert os.listdir(tmp_path / "results") == ["figure1_seed_1.json"]
    # a lab table's block is left alone when only a lab_sizes run is given, and the other way round
    page = "<!-- summarize:claims -->\nold\n<!-- /summarize:claims -->\n"
    assert summarize.rewrite(page, [s]) == page


def test_figure1_claims_count_the_seeds_where_each_comparison_holds_and_where_intervals_part():
    """Two hand-made lab_sizes runs: in seed 1 the small PPO is above the small SFT with intervals
    apart; in seed 2 it is above with intervals overlapping; seed 2's small PPO-ptx is below SFT."""
    def run(seed, small, large):
        sizes = []
        for name, rates in (("small", small), ("large", large)):
            sizes.append({"name": name, "params": 1000, "policies": {
                k: {"win_rate": w, "win_rate_ci": [w - 0.05, w + 0.05]}
                for k, w in zip(("base", "sft", "ppo", "ppo_ptx"), rates)}})
        return {"kind": "figure1", "seed": seed, "minutes": 9.5 if seed == 1 else None,
                "reference": "sft@large", "sizes": sizes,
                "settings": {"from_lab": "out/lab"} if seed == 1 else {}}
    runs = [run(1, (0.20, 0.40, 0.55, 0.52), (0.30, 0.50, 0.70, 0.65)),
            run(2, (0.20, 0.40, 0.48, 0.35), (0.45, 0.50, 0.70, 0.65))]
    rows = {tuple(c.strip() for c in line.split("|")[1:3]): line.split("|")[3:5]
            for line in summarize.figure1_claims(runs).splitlines() if line.startswith("| ")}
    cells = lambda claim, size: [c.strip() for c in rows[(claim, size)]]
    assert cells("PPO above SFT", "small") == ["2 of 2", "1 of 2"]
    assert cells("PPO-ptx above SFT", "small") == ["1 of 2", "1 of 2"]
    assert cells("SFT above base", "large") == ["2 of 2", "1 of 2"]
    assert cells("the small PPO above the large base model", "") == ["2 of 2", "1 of 2"]
    assert cells("the small PPO-ptx above the large base model", "") == ["1 of 2", "1 of 2"]
    seeds = summarize.figure1_seeds(runs)
    assert "| 1 | small | 0.20 [0.15, 0.25] | 0.40 [0.35, 0.45] | 0.55 [0.50, 0.60] |" in seeds
    assert "| 1 | large |" in seeds and "9.5 (with --from_lab) |" in seeds
