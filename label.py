"""
Where the reward model's data comes from (InstructGPT, Ouyang et al. 2022, arXiv:2203.02155,
section 3.1 and Figure 2): the current policy samples K responses to a prompt (K = 4..9 in the
paper), a labeler ranks them best to worst, and the rankings train the reward model; steps 2
(reward.py) and 3 (ppo.py) can then be repeated with the improved policy. This script does the
sampling and the asking, and appends one line

    {"prompt": "...", "ranked": [best, ..., worst], "policy": "<fingerprint of --policy>"}

per ranked prompt to --out, which reward.py trains on as it is (--train_files rankings.jsonl,
mixable with HH comparison files). Each line is flushed to disk as soon as it is given: a crash
or Ctrl-C loses nothing already ranked, and a rerun with the same --out skips the rankings
already there (resumable); a last line cut short by a kill is moved to --out.torn first. A rerun
continues only the samples of the same --policy checkpoints: a file holding rankings of other
checkpoints (a retrained policy at the same path) is refused rather than mixed. One label.py at a
time writes a file: a second one on the same --out stops (a lock on --out.lock, released whenever
the first ends, even by kill -9).

Labelers, behind one interface: a callable (prompt, responses) -> ranking (indices into responses,
best first) or None (skip this prompt).
  human   a terminal: the prompt and the K responses numbered, read a ranking such as "2 1 4 3"
          (best first); s = skip, q = quit, ? = help. Identical responses are shown once and marked.
  reward  the scores of a reward-model checkpoint (--reward_ckpt): distillation, tests.
  fn      a Python function (prompt, response) -> float (--labeler_fn file.py:NAME); with
          --labeler_arg S, NAME(S) is called once and must return that function (a factory, e.g. of
          a gold labeler).
Score-based labelers (reward, fn) take --label_noise T: a Bradley-Terry labeler who puts
response i above j with probability sigmoid((s_i - s_j) / T), the preference model eq. (1) fits;
T = 0 ranks exactly.

    python label.py --policy out/sft/ckpt.pt --prompts data/hh_rlhf/prompts_train.jsonl --k 4 \\
        --labeler human --out data/hh_rlhf/rankings.jsonl
    # a second round: K/2 samples of each policy, shuffled
    python label.py --policy out/ppo/ckpt.pt,out/sft/ckpt.pt --labeler human \\
        --out data/hh_rlhf/rankings_round2.jsonl
    python label.py --labeler reward --reward_ckpt out/reward/ckpt.pt --max_prompts 200 \\
        --out out/distill.jsonl
    python label.py --labeler fn --labeler_fn mylabel.py:score --label_noise 0.5 \\
        --out out/rankings.jsonl
    python reward.py --config tiny --train_files rankings.jsonl,comparisons_train.jsonl
"""

import collections
import contextlib
import fcntl
import hashlib
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from typing import Optional

import torch

from lib.checkpoints import load_model
from lib.config import load_function, require, run
from lib.data import read_jsonl, read_prompts, set_aside_torn_tail
from lib.responses import decode_responses, sample_responses, score_texts
from lib.tokens import encode_prompt, get_tokenizer, pad_left
from lib.tracking import format_time
from lib.training import autocast, setup_device


@dataclass
class Config:
    # io
    policy: str = "out/sft/ckpt.pt"  # the policy whose samples are ranked; several: K shared out
    prompts: str = "data/hh_rlhf/prompts_train.jsonl"  # JSON lines with a "prompt" field
    out: str = "data/hh_rlhf/rankings.jsonl"  # rankings appended here; those in it are not redone
    max_prompts: int = 0  # use only the first N prompts of the file (0 = all)
    # sampling
    k: int = 4  # responses per prompt (paper: K = 4..9)
    rankings_per_prompt: int = 1  # rank each prompt this many times, each time K fresh samples
    temperature: float = 1.0  # sampling temperature (1 = the policy's own distribution)
    max_new_tokens: int = 64  # response length limit
    max_prompt_tokens: int = 192  # a longer prompt keeps its end (the model sees only that part)
    batch_size: int = 8  # prompts per generation call (each gives k rows)
    # labeler
    labeler: str = "human"  # human, reward or fn
    reward_ckpt: str = ""  # reward model of --labeler reward (e.g. out/reward/ckpt.pt)
    labeler_fn: str = ""  # --labeler fn: "path/to/file.py:NAME" (or "module:NAME")
    labeler_arg: Optional[str] = None  # if given, NAME(labeler_arg) returns the scoring function
    label_noise: float = 0.0  # Bradley-Terry temperature of the reward/fn labelers (0 = exact)
    # system
    strict: bool = False  # refuse a file with a malformed line (default: skip it, naming file:line)
    device: str = "auto"  # auto, cpu, cuda, ...
    dtype: str = "auto"  # autocast: auto = bfloat16 on CUDA, float32 on CPU; or bfloat16, float32
    seed: int = 1337

    RANGES = {"max_prompts": ">= 0", "k": ">= 1", "rankings_per_prompt": ">= 1",
              "label_noise": ">= 0", "labeler": ("human", "reward", "fn")}
    PATHS = {"policy": "model", "prompts": "file", "out": "out_file",
             "reward_ckpt": "model"}  # checked where the flags are parsed


CONFIGS = {"tiny": dict(max_new_tokens=48, max_prompt_tokens=128)}  # matches ppo.py's tiny rollouts


# ----------------------------------------------------------------------------------------------
# Rankings from scores: exact, or a noisy Bradley-Terry labeler

def uniform01(rng):
    """A uniform number strictly inside (0, 1), so log(-log(u)) is always finite."""
    return (rng.getrandbits(53) + 0.5) / 2 ** 53


def rank_by_scores(scores, noise=0.0, rng=None):
    """Indices of `scores`, best first. noise = 0: by score, equal scores in random order.
    noise = T > 0: sort by s_i / T + g_i with g_i ~ Gumbel(0, 1) i.i.d. The difference of two
    Gumbels is logistic, so every pair is ordered as a Bradley-Terry labeler would order it, P(i
    above j) = sigmoid((s_i - s_j) / T) (the model behind InstructGPT eq. (1)), and the whole
    ranking is a Plackett-Luce sample with weights exp(s_i / T)."""
    rng = rng or random.Random(0)
    tiebreak = [rng.random() for _ in scores]
    if noise <= 0:
        return sorted(range(len(scores)), key=lambda i: (-scores[i], tiebreak[i]))
    keys = [s / noise - math.log(-math.log(uniform01(rng))) for s in scores]
    return sorted(range(len(scores)), key=lambda i: -keys[i])


def pairwise_agreement(ranking, scores):
    """(pairs ordered as the exact scores order them, pairs whose exact
    scores differ) for one ranking."""
    position = {i: p for p, i in enumerate(ranking)}
    agree = total = 0
    for i in range(len(scores)):
        for j in range(i + 1, len(scores)):
            if scores[i] != scores[j]:
                total += 1
                agree += (scores[i] > scores[j]) == (position[i] < position[j])
    return agree, total


def tied_pairs(responses, scores=None):
    """Pairs a labeler cannot order: identical responses, or (for a score labeler) equal scores."""
    return sum(responses[i] == responses[j] or (scores is not None and scores[i] == scores[j])
               for i in range(len(responses)) for j in range(i + 1, len(responses)))


class ScoreLabeler:
    """Ranks the K responses by score_fn(prompt, responses) -> K floats, exactly or with
    Bradley-Terry noise, and keeps count of its agreement with the exact order (over pairs whose
    scores differ) and of ties."""

    def __init__(self, score_fn, noise=0.0, seed=0):
        self.score_fn, self.noise, self.rng = score_fn, noise, random.Random(seed)
        self.agree = self.pairs = self.ties = 0

    def __call__(self, prompt, responses):
        scores = [float(s) for s in self.score_fn(prompt, responses)]
        ranking = rank_by_scores(scores, self.noise, self.rng)
        agree, pairs = pairwise_agreement(ranking, scores)
        self.agree, self.pairs = self.agree + agree, self.pairs + pairs
        self.ties += tied_pairs(responses, scores)
        return ranking


def reward_model_scorer(reward_ckpt, device, ctx):
    """score_fn(prompt, responses) -> K floats from a reward-model checkpoint, scored as reward.py
    trained it (prompt + response + EOS, with the token budgets of its training config)."""
    reward_model, ckpt = load_model(reward_ckpt, kind="scalar", device=device)
    reward_model.eval()
    rm_config, enc = (ckpt or {}).get("config", {}), get_tokenizer(reward_model.config.vocab)

    def score_fn(prompt, responses):
        return score_texts(reward_model, rm_config, enc, [prompt] * len(responses), responses, ctx,
                           batch_size=len(responses))
    return score_fn


# ----------------------------------------------------------------------------------------------
# The human labeler: a terminal interface

class Quit(Exception):
    """The labeler asked to stop (q, end of input, Ctrl-C at the prompt)."""


HELP = """Rank the responses from best to worst by their numbers, e.g. "2 1 4 3" means 2 is best
and 3 is worst (commas are fine; with 9 or fewer responses "2143" works too). Judge as InstructGPT's
labelers did: helpful, honest and harmless. Identical responses are shown once; rank them as one.
  s  skip this prompt (not written; asked again in a later run)
  q  quit (every ranking given so far is already saved; rerun the same command to continue)
  ?  this help"""


def parse_ranking(text, n):
    """A ranking of responses 1..n typed best first -> 0-based indices, or ValueError with
    a one-line reason."""
    text = text.strip()
    tokens = text.replace(",", " ").split()
    if len(tokens) == 1 and 1 < n <= 9 and text.isdigit() and len(text) > 1:
        tokens = list(text)  # "2143"
    if not tokens:
        raise ValueError(f"type the numbers of the responses best first, e.g. "
                         f"{' '.join(map(str, range(n, 0, -1)))} (s skip, q quit, ? help)")
    numbers = []
    for t in tokens:
        if not t.isdigit():
            raise ValueError(f"'{t}' is not a response number: type numbers 1 to {n}, best first "
                             f"(? for help)")
        if not 1 <= int(t) <= n:
            raise ValueError(f"{t} is out of range: the responses are numbered 1 to {n}")
        if int(t) in numbers:
            raise ValueError(f"{t} appears twice: rank each response exactly once")
        numbers.append(int(t))
    if len(numbers) < n:
        missing = " ".join(str(i) for i in range(1, n + 1) if i not in numbers)
        raise ValueError(f"incomplete: {len(numbers)} of {n} responses ranked, missing {missing}")
    return [i - 1 for i in numbers]


def show_text(text, limit):
    if len(text) <= limit:
        return text
    return f"[... {len(text) - limit} earlier characters]" + text[-limit:]


class HumanLabeler:
    """Shows a prompt and its responses (identical ones once, marked) and reads a ranking from
    `input_fn` (the built-in input; tests pass a scripted one). Bad input gets one line and the
    same question again."""

    def __init__(self, input_fn=input, prompt_chars=1500):
        self.input_fn, self.prompt_chars = input_fn, prompt_chars

    def __call__(self, prompt, responses):
        groups = {}  # text -> indices of the responses with that text, in first-seen order
        for i, r in enumerate(responses):
            groups.setdefault(r, []).append(i)
        unique = list(groups.items())
        print(f"\n[prompt]\n{show_text(prompt, self.prompt_chars)}")
        for n, (text, idx) in enumerate(unique, 1):
            mark = ""
            if len(idx) > 1:
                mark = f"   (identical: sampled {len(idx)} of {len(responses)} times, shown once)"
            print(f"\n[{n}]{mark}\n{text if text.strip() else '(empty response)'}")
        question = f"\nrank 1-{len(unique)} best first (s skip, q quit, ? help): "
        while True:
            try:
                answer = self.input_fn(question).strip()
            except (EOFError, KeyboardInterrupt):
                print()
                raise Quit
            if answer.lower() in ("q", "quit"):
                raise Quit
            if answer.lower() in ("s", "skip"):
                return None
            if answer in ("?", "h", "help"):
                print(HELP)
                continue
            try:
                order = parse_ranking(answer, len(unique))
            except ValueError as e:
                print(f"  {e}")
                continue
            return [i for u in order for i in unique[u][1]]  # identical responses stay side by side


# ----------------------------------------------------------------------------------------------
# Sampling, resuming, writing

@contextlib.contextmanager
def one_writer(path):
    """Hold an exclusive lock on `path`.lock while labelling into `path`: a second label.py on
    the same file (two terminals) stops with a message instead of ranking the same prompts again.
    The kernel drops a flock when its process ends, however it ends (kill -9 too), so a killed
    labeler never leaves a stale lock."""
    with open(path + ".lock", "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            sys.exit(f"error: another label.py is writing {path} (it holds the lock {path}.lock). "
                     f"Let it finish, or give this one another --out: two labelers on one file "
                     f"would rank the same prompts twice.")
        yield  # the lock goes with the file when it is closed


def policy_fingerprint(paths):
    """Which checkpoints a file's samples came from: the SHA-256 of the --policy files' bytes, in
    --policy order (the order decides which policy gives the extra sample), first 16 hex digits.
    Every appended line carries it. Reading the files costs about a second per GB, once per run."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            digest.update(hashlib.file_digest(f, "sha256").digest())
    return digest.hexdigest()[:16]


def rankings_in(path, strict=False):
    """The rankings `path` already holds (a missing file has none), read as reward.py reads it; a
    torn last line (an interrupted write) was set aside before (set_aside_torn_tail)."""
    if not os.path.isfile(path):
        return []
    rows = read_jsonl(path, "rankings", {"prompt": str, "ranked": list}, strict=strict,
                      allow_empty=True, hint="")
    if not rows and open(path, "rb").read().strip():
        sys.exit(f"error: --out {path} holds lines, but not one ranking {{\"prompt\", "
                 f"\"ranked\"}}: is it the right file? label.py appends its rankings to it")
    return rows


def already_ranked(rows, path, policy, policy_paths):
    """How many of the rankings `rows` (of the file `path`) each prompt has. A file holding rankings
    of other checkpoints than `policy_paths` (fingerprint `policy`) stops the run: continuing it
    would hand reward.py two policies' rankings as one (a policy retrained at the same path, a
    second run into the same --out). Lines without a "policy" (written by hand, or by label.py
    before it kept one) count as they are."""
    others = collections.Counter(str(row["policy"]) for row in rows
                                 if row.get("policy", policy) != policy)
    if others:
        sys.exit(f"error: --out {path} holds {sum(others.values())} rankings of samples from other "
                 f"checkpoints than --policy {','.join(policy_paths)} (fingerprint "
                 f"{', '.join(others)} in the file, {policy} now): a policy retrained at the same "
                 f"path, or an earlier run's file. label.py continues a file only for the "
                 f"checkpoints that began it. Rank into a new --out (reward.py --train_files takes "
                 f"several files), or move {path} away to start it again")
    return collections.Counter(row["prompt"] for row in rows)


def sample_from_policies(policies, enc, prompts, k, cfg, generator, device, rng):
    """K responses per prompt shared out over several policies (the first k % n give one more),
    shuffled per prompt so that a labeler cannot tell which policy wrote which. The paper's
    comparisons are between outputs of several models; in a second round this puts the new policy's
    habits next to the old policy's answers."""
    n = len(policies)
    if n == 1:
        return sample_responses_text(policies[0], enc, prompts, k, cfg, generator, device)
    per_policy = [sample_responses_text(policy, enc, prompts, k // n + (j < k % n), cfg, generator,
                                        device)
                  for j, policy in enumerate(policies)]
    samples = []
    for i in range(len(prompts)):
        responses = [r for of_policy in per_policy for r in of_policy[i]]
        rng.shuffle(responses)
        samples.append(responses)
    return samples


@torch.no_grad()
def sample_responses_text(policy, enc, prompts, k, cfg, generator, device):
    """K sampled responses (text, cut at the first EOS) for each prompt: [[r_1, ..., r_k], ...]."""
    queries, query_mask = pad_left([encode_prompt(enc, p, cfg.max_prompt_tokens)
                                    for p in prompts for _ in range(k)])
    batch = sample_responses(policy, queries.to(device), query_mask.to(device),
                             cfg.max_new_tokens, cfg.temperature, generator)  # (B k, P + R)
    texts = decode_responses(enc, batch)
    return [texts[i * k:(i + 1) * k] for i in range(len(prompts))]


def append_line(f, row):
    """One JSON line, on disk before the next question is asked (flush + fsync)."""
    f.write(json.dumps(row) + "\n")
    f.flush()
    os.fsync(f.fileno())


def progress_line(done, total, ranked, skipped, ties, elapsed):
    eta = format_time(elapsed / done * (total - done)) if done else "?"
    per_prompt = elapsed / max(done, 1)
    per = f"{per_prompt:.1f} s/prompt" if per_prompt >= 1 else f"{1000 * per_prompt:.0f} ms/prompt"
    return (f"{done}/{total} prompts done | ranked {ranked} | skipped {skipped} | ties {ties} | "
            f"{per} | eta {eta}")


def main(cfg, input_fn=input):
    """Sample K responses per prompt, rank them, append the rankings to cfg.out (its one
    writer). Returns a summary dict."""
    require(cfg.k >= 2, "k must be at least 2 (a ranking compares responses)")
    require(cfg.labeler in ("human", "reward", "fn"),
            f"--labeler must be human, reward or fn, not '{cfg.labeler}'")
    require(cfg.labeler != "fn" or cfg.labeler_fn,
            "--labeler fn needs --labeler_fn path/to/file.py:NAME")
    require(cfg.labeler != "reward" or cfg.reward_ckpt,
            "--labeler reward needs --reward_ckpt (e.g. out/reward/ckpt.pt)")
    require(cfg.label_noise >= 0, "--label_noise is a temperature: 0 (exact) or more")
    require(os.path.abspath(cfg.out) != os.path.abspath(cfg.prompts),
            f"--out {cfg.out} is the --prompts file: the rankings would be appended to the "
            f"prompts; give another --out")
    os.makedirs(os.path.dirname(os.path.abspath(cfg.out)), exist_ok=True)
    with one_writer(cfg.out):
        return label(cfg, input_fn)


def label(cfg, input_fn):
    """main()'s work, under the lock on cfg.out: the prompts and the rankings already in cfg.out,
    the labeler, the policies, the prompts not yet ranked from their samples, then
    sample -> rank -> append, prompt by prompt."""
    t_start = time.time()
    device = setup_device(cfg.device, cfg.seed)
    ctx = autocast(device, cfg.dtype)

    prompts = read_prompts(cfg.prompts, cfg.max_prompts, cfg.strict)
    # a line cut short by a killed run: the next ranking starts on a line of its own
    set_aside_torn_tail(cfg.out)
    existing = rankings_in(cfg.out, cfg.strict)

    # the labeler
    if cfg.labeler == "human":
        labeler = HumanLabeler(input_fn)
    else:
        if cfg.labeler == "reward":
            score_fn = reward_model_scorer(cfg.reward_ckpt, device, ctx)
        else:
            fn = load_function(cfg.labeler_fn, cfg.labeler_arg, takes=("prompt", "response"))
            score_fn = lambda prompt, responses: [fn(prompt, r) for r in responses]
        labeler = ScoreLabeler(score_fn, cfg.label_noise, cfg.seed)

    # the policies whose samples are ranked
    paths = [path for path in cfg.policy.split(",") if path]
    require(1 <= len(paths) <= cfg.k,
            f"--policy names {len(paths)} checkpoints; give 1 to k = {cfg.k}")
    policies = [load_model(path, kind="gpt", device=device)[0].eval() for path in paths]
    for path, policy in zip(paths, policies):
        longest = cfg.max_prompt_tokens + cfg.max_new_tokens
        require(longest <= policy.config.block_size, f"max_prompt_tokens + max_new_tokens = "
                f"{longest} exceeds the block_size {policy.config.block_size} of {path}")
    require(len({tuple(policy.config.vocab or ()) for policy in policies}) == 1, f"the --policy "
            f"checkpoints ({', '.join(paths)}) have different vocabularies: rank samples of models "
            f"of one vocabulary")
    enc = get_tokenizer(policies[0].config.vocab)  # GPT-2's, or a lab world's (config.vocab)
    fingerprint = policy_fingerprint(paths)

    # the prompts not yet ranked in --out from these checkpoints' samples
    done = already_ranked(existing, cfg.out, fingerprint, paths)
    # pass by pass: every prompt's first ranking, then every prompt's second, ...
    todo = [p for r in range(cfg.rankings_per_prompt) for p in prompts if done[p] <= r]
    wanted = len(prompts) * cfg.rankings_per_prompt
    print(f"{len(prompts)} prompts in {cfg.prompts}, {cfg.rankings_per_prompt} ranking(s) each; "
          f"{wanted - len(todo)} already in {cfg.out}; {len(todo)} to go, {cfg.k} responses each")

    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    shuffle_rng = random.Random(cfg.seed)

    ranked = skipped = identical = human_ties = 0
    stopped = False
    t0 = time.time()
    with open(cfg.out, "a") as f:
        try:
            for b in range(0, len(todo), cfg.batch_size):
                batch = todo[b:b + cfg.batch_size]
                with ctx:
                    samples = sample_from_policies(policies, enc, batch, cfg.k, cfg, generator,
                                                   device, shuffle_rng)
                for n, (prompt, responses) in enumerate(zip(batch, samples), b + 1):
                    if cfg.labeler == "human":
                        progress = progress_line(n - 1, len(todo), ranked, skipped, human_ties,
                                                 time.time() - t0)
                        print("\n" + "=" * 100 + "\n" + progress)
                    if len(set(responses)) == 1:  # nothing to compare
                        skipped, identical = skipped + 1, identical + 1
                        continue
                    ranking = labeler(prompt, responses)
                    if ranking is None:
                        skipped += 1
                        continue
                    require(sorted(ranking) == list(range(cfg.k)),
                            f"labeler returned {ranking}, not a ranking")
                    append_line(f, {"prompt": prompt, "ranked": [responses[i] for i in ranking],
                                    "policy": fingerprint})
                    ranked += 1
                    human_ties += tied_pairs(responses)
                if cfg.labeler != "human":
                    print(progress_line(min(b + cfg.batch_size, len(todo)), len(todo), ranked,
                                        skipped, labeler.ties, time.time() - t0), flush=True)
        except (Quit, KeyboardInterrupt):
            stopped = True
    ties = human_ties if cfg.labeler == "human" else labeler.ties
    summary = {"ranked": ranked, "skipped": skipped, "ties": ties, "out": cfg.out,
               "all_identical": identical,
               "already_ranked": wanted - len(todo), "remaining": len(todo) - ranked - skipped,
               "stopped": stopped, "time_s": time.time() - t_start}
    if cfg.labeler != "human":
        agreement = labeler.agree / labeler.pairs if labeler.pairs else float("nan")
        summary["agreement_with_exact"] = agreement
        summary["agreement_pairs"] = labeler.pairs
    agreement = ""
    if cfg.labeler != "human":
        agreement = (f" | agreement with the exact order {summary['agreement_with_exact']:.3f} "
                     f"over {labeler.pairs} pairs (label_noise {cfg.label_noise})")
    print(("stopped: " if stopped else "done: ") + f"ranked {ranked}, skipped {skipped} "
          f"({identical} with all {cfg.k} responses identical), ties {ties} (pairs of identical "
          f"text or equal score, put in random order)" + agreement
          + f" | {ranked} lines appended to {cfg.out} | {summary['remaining']} prompts left")
    return summary


if __name__ == "__main__":
    run(main, Config, CONFIGS)
