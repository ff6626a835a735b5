"""
The handout's lab experiments (course/README.md, "Lab experiments"), run and tabulated: each is the
class lab with one flag changed, on a few seeds; the table gives, per experiment, the median and
[min, max] over the seeds of what the handout asks students to look at. course/instructor.md's
tables are this script's output (between `<!-- experiments:NAME -->` markers), never typed.

    python course/experiments.py run --seeds 21 22 23 --out_dir out/course      # every experiment
    python course/experiments.py run --seeds 21 --only kl0 noise3 --out_dir out/course
    python course/experiments.py table out/course                  # print the tables
    python course/experiments.py table out/course --save course/results \
        --write course/instructor.md                     # keep the runs' results, fill the page
    python course/experiments.py table course/results --write course/instructor.md  # from those

`--save` keeps each run's results.json without its example answers as course/results/NAME_seedN.json
(committed: tests/test_course.py checks the page's tables are this script's output on them).

A run already finished (its results.json exists) is not run again.
"""
import argparse
import json
import os
import re
import statistics
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# name -> (the flags added to `pipeline.py --task lab --config class`, what it varies)
EXPERIMENTS = {
    "default": ([], "the class lab as it is (kl_coef 0.1, one round, K = 8, label noise 1.5)"),
    "kl0": (["--kl_coef", "0"], "no KL penalty in PPO"),
    "rounds2": (["--rounds", "2"], "a second round of rankings, of the round-1 policy's samples"),
    "noise0": (["--label_noise", "0"], "exact labelers"),
    "noise3": (["--label_noise", "3"], "very noisy labelers"),
    "k2": (["--k", "2"], "two responses ranked per prompt instead of eight"),
}
# (results.json path, column title, format)
COLUMNS = [
    (("policies", "ppo", "win_rate_vs_sft"), "PPO win vs SFT", "{:.2f}"),
    (("policies", "ppo", "win_rate_ci", 0), "its CI low", "{:.2f}"),
    (("policies", "ppo", "helpful"), "helpful", "{:.2f}"),
    (("policies", "ppo", "truthful"), "truthful", "{:.2f}"),
    (("policies", "ppo", "harmless"), "harmless", "{:.2f}"),
    (("policies", "ppo", "kl_to_sft"), "KL to SFT", "{:.1f}"),
    (("reward_model", "gold_agreement"), "RM agreement", "{:.2f}"),
    (("policies", "ppo_ptx", "win_rate_vs_sft"), "PPO-ptx win", "{:.2f}"),
    (("policies", "dpo", "win_rate_vs_sft"), "DPO win", "{:.2f}"),
    (("minutes",), "minutes", "{:.1f}"),
]


def run_dir(out_dir, name, seed):
    return os.path.join(out_dir, f"{name}_seed{seed}")


def run(args):
    for name in args.only or EXPERIMENTS:
        flags, _ = EXPERIMENTS[name]
        for seed in args.seeds:
            out = run_dir(args.out_dir, name, seed)
            if os.path.isfile(os.path.join(out, "results.json")):
                print(f"{name}, seed {seed}: done already ({out})")
                continue
            command = [sys.executable, "pipeline.py", "--task", "lab", "--config", "class",
                       "--seed", str(seed), "--out_dir", os.path.abspath(out), *flags]
            print(f"{name}, seed {seed}: {' '.join(command[1:])}", flush=True)
            os.makedirs(out, exist_ok=True)
            with open(out + ".log", "w") as log:
                code = subprocess.run(command, cwd=REPO, stdout=log,
                                      stderr=subprocess.STDOUT).returncode
            if code != 0:
                sys.exit(f"error: {name}, seed {seed} failed (exit code {code}); "
                         f"its log: {out}.log")


def value(results, path):
    for key in path:
        results = results[key]
    return results


def collect(out_dir):
    """{experiment: [results.json of each seed]} for the runs found in out_dir: run folders
    (NAME_seedN/results.json) or saved summaries (NAME_seedN.json), by seed."""
    found = {}
    for name in EXPERIMENTS:
        runs = []
        for entry in os.listdir(out_dir):
            m = re.fullmatch(rf"{name}_seed(\d+)(\.json)?", entry)
            path = os.path.join(out_dir, entry, "results.json") if m and not m.group(2) else \
                os.path.join(out_dir, entry)
            if m and os.path.isfile(path):
                with open(path) as f:
                    runs.append(json.load(f))
        if runs:
            found[name] = sorted(runs, key=lambda r: r["seed"])
    return found


def save(found, folder):
    """Each run's results without its example answers, as folder/NAME_seedN.json."""
    os.makedirs(folder, exist_ok=True)
    for name, runs in found.items():
        for r in runs:
            path = os.path.join(folder, f"{name}_seed{r['seed']}.json")
            with open(path + ".tmp", "w") as f:
                json.dump({k: v for k, v in r.items() if k != "examples"}, f, indent=1)
                f.write("\n")
            os.replace(path + ".tmp", path)


def cell(values, fmt):
    """The median, and [min, max] when there is more than one value."""
    if len(values) == 1:
        return fmt.format(values[0])
    return f"{fmt.format(statistics.median(values))} [{fmt.format(min(values))}, " \
           f"{fmt.format(max(values))}]"


def tables(found):
    lines = ["| experiment | seeds | " + " | ".join(t for _, t, _ in COLUMNS) + " |",
             "|---|---|" + "---|" * len(COLUMNS)]
    for name, runs in found.items():
        seeds = ", ".join(str(r["seed"]) for r in runs)
        cells = [cell([value(r, path) for r in runs], fmt) for path, _, fmt in COLUMNS]
        lines.append(f"| {name} | {seeds} | " + " | ".join(cells) + " |")
    lines += ["", "Median [min, max] over the seeds; every column is of the final `ppo` policy "
              "but RM agreement (the final reward model), PPO-ptx, DPO and minutes (the whole run, "
              "on the machine that ran it)."]
    per_seed = ["| experiment | seed | SFT gold | PPO gold (KL) | corpus loss: SFT, PPO, PPO-ptx "
                "| over-optimisation gold: start, peak (KL), end (KL) | its RM score: start, end "
                "| best-of-n gold at n = 1, max |",
                "|---|---|---|---|---|---|---|---|"]
    for name, runs in found.items():
        for r in runs:
            p, oo, bon = r["policies"], r["overoptimisation"], r.get("best_of_n") or []
            peak = max(oo, key=lambda q: q["gold_score"]) if oo else None
            curve = (f"{oo[0]['gold_score']:.2f}, {peak['gold_score']:.2f} "
                     f"({peak['kl_to_sft']:.1f}), {oo[-1]['gold_score']:.2f} "
                     f"({oo[-1]['kl_to_sft']:.1f})") if oo else "-"
            rm = f"{oo[0]['rm_score']:.2f}, {oo[-1]['rm_score']:.2f}" if oo else "-"
            best = (f"{bon[0]['gold_score']:.2f}, {bon[-1]['gold_score']:.2f} (n = {bon[-1]['n']}, "
                    f"KL {bon[-1]['kl_to_sft']:.2f})") if bon else "-"
            losses = ", ".join(f"{p[k]['corpus_loss']:.3f}" for k in ("sft", "ppo", "ppo_ptx"))
            per_seed.append(f"| {name} | {r['seed']} | {p['sft']['gold_score']:.2f} | "
                            f"{p['ppo']['gold_score']:.2f} ({p['ppo']['kl_to_sft']:.1f}) | "
                            f"{losses} | {curve} | {rm} | {best} |")
    behaviour = ["| experiment | policy | gold | helpful | truthful | harmless | false premise "
                 "| KL to SFT |", "|---|---|---|---|---|---|---|---|"]
    for name, runs in found.items():
        for policy in ("sft", "ppo", "ppo_ptx", "dpo"):
            cells = [cell([r["policies"][policy][key] for r in runs], fmt) for key, fmt in
                     (("gold_score", "{:.2f}"), ("helpful", "{:.2f}"), ("truthful", "{:.2f}"),
                      ("harmless", "{:.2f}"), ("false_premise", "{:.2f}"),
                      ("kl_to_sft", "{:.1f}"))]
            behaviour.append(f"| {name} | {policy} | " + " | ".join(cells) + " |")
    behaviour += ["", "Median [min, max] over the seeds of each experiment. gold: the exact "
                  "labeler's mean score; helpful, truthful, harmless, false premise: the share of "
                  "held-out prompts of each kind answered as the world's instructions ask "
                  "(course/README.md, glossary)."]
    blocks = {"experiments": "\n".join(lines), "per_seed": "\n".join(per_seed),
              "behaviour": "\n".join(behaviour)}
    if "default" in found:  # the class lab's own steps
        runs = found["default"]
        steps = list(dict.fromkeys(k for r in runs for k in r["step_seconds"]))
        times = ["| step | seconds |", "|---|---|"]
        times += [f"| {k} | {cell([r['step_seconds'][k] for r in runs], '{:.0f}')} |"
                  for k in steps if all(k in r["step_seconds"] for r in runs)]
        times += [f"| the whole class lab | {cell([r['minutes'] for r in runs], '{:.1f}')} min |",
                  "", f"The `default` runs (seeds {', '.join(str(r['seed']) for r in runs)}): "
                  "median [min, max] wall time of each step, in the order the pipeline runs them."]
        blocks["times"] = "\n".join(times)
    return blocks


def write(page, blocks):
    with open(page) as f:
        text = f.read()
    for name, table in blocks.items():
        pattern = re.compile(rf"(<!-- experiments:{name} -->\n).*?(<!-- /experiments:{name} -->)",
                             re.S)
        if not pattern.search(text):
            sys.exit(f"error: {page} has no <!-- experiments:{name} --> block")
        text = pattern.sub(lambda m: m.group(1) + "\n" + table + "\n\n" + m.group(2), text)
    with open(page + ".tmp", "w") as f:
        f.write(text)
    os.replace(page + ".tmp", page)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run the experiments (the class lab with one flag changed)")
    r.add_argument("--seeds", type=int, nargs="+", required=True)
    r.add_argument("--only", nargs="+", choices=list(EXPERIMENTS), help="these experiments only")
    r.add_argument("--out_dir", default="out/course")
    t = sub.add_parser("table", help="the tables of the runs in a folder")
    t.add_argument("out_dir")
    t.add_argument("--write", help="replace the <!-- experiments:NAME --> blocks of this page")
    t.add_argument("--save", help="keep each run's results (no examples) in this folder")
    args = p.parse_args(argv)
    if args.command == "run":
        return run(args)
    if not os.path.isdir(args.out_dir):
        p.error(f"{args.out_dir} is not a folder of experiment runs (course/experiments.py run)")
    found = collect(args.out_dir)
    if not found:
        p.error(f"{args.out_dir} holds no finished run named EXPERIMENT_seedN (or .json) "
                f"({', '.join(EXPERIMENTS)})")
    blocks = tables(found)
    if args.save:
        save(found, args.save)
    if args.write:
        write(args.write, blocks)
    else:
        print("\n\n".join(blocks.values()))


if __name__ == "__main__":
    main()
