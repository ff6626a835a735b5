"""Shared test setup: import the repository's modules, use the offline tokenizer copy, few
threads; and what several test modules use (a test module never imports another test module),
grouped by stage."""
import contextlib
import copy
import gzip
import importlib.util
import json
import os
import random
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(REPO), "shared")
sys.path.insert(0, REPO)
if os.path.isdir(os.path.join(SHARED, "tiktoken")):
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", os.path.join(SHARED, "tiktoken"))
torch.set_num_threads(min(2, os.cpu_count() or 1))

SHARED_HH = os.path.join(SHARED, "data", "hh-rlhf")
needs_shared_hh = pytest.mark.skipif(not os.path.isdir(SHARED_HH),
                                     reason="../shared/data/hh-rlhf not present")


# The repository's modules the shared helpers below use: importable once REPO is
# on sys.path (above).
import ppo  # noqa: E402
import reward  # noqa: E402
import sft  # noqa: E402
from lib.tokens import EOS, pad_left  # noqa: E402
from lib.tracking import read_metrics  # noqa: E402
from model import GPT, GPTConfig, ScalarGPT  # noqa: E402

# Data preparation: prepare.py as a module, the HH fixtures, dialogue markers
# (test_prepare, test_sft, test_faults).

_spec = importlib.util.spec_from_file_location("hh_rlhf_prepare",
                                               os.path.join(REPO, "data", "hh_rlhf", "prepare.py"))
prepare = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(prepare)

HH_FIXTURES = Path(REPO) / "tests" / "fixtures" / "hh"  # <subset>/<split>.jsonl, plain text
H, A = "\n\nHuman: ", "\n\nAssistant:"


def ppo_models(policy, ref_policy, critic, reward_model=None, reward_fn=None):
    """The record of models ppo.rollout and ppo.evaluate take (ppo.setup builds it in a run)."""
    return SimpleNamespace(policy=policy, ref_policy=ref_policy, critic=critic,
                           reward_model=reward_model, reward_fn=reward_fn)



def gzip_fixtures(dest):
    """Copy the plain fixture folder to dest as <subset>/<split>.jsonl.gz, like the hub layout."""
    for src in HH_FIXTURES.glob("*/*.jsonl"):
        (dest / src.parent.name).mkdir(parents=True, exist_ok=True)
        (dest / src.parent.name / (src.name + ".gz")).write_bytes(gzip.compress(src.read_bytes()))
    return dest


@pytest.fixture(scope="session")
def quick_lab(tmp_path_factory):
    """One `pipeline.py --task lab --quick --in_process` run for the whole session (its folder and
    what it printed): tests/test_lab.py checks its results' shape, tests/test_course.py compares a
    student copy's run with it."""
    out = tmp_path_factory.mktemp("quick_lab") / "lab"
    run = subprocess.run([sys.executable, "pipeline.py", "--task", "lab", "--quick", "--in_process",
                          "--out_dir", str(out)], cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return out, run.stdout


@pytest.fixture(scope="session")
def hh_prepared(tmp_path_factory):
    """The shared HH-RLHF copy prepared by data/hh_rlhf/prepare.py into a temp folder
    (skips if absent)."""
    if not os.path.isdir(SHARED_HH):
        pytest.skip("../shared/data/hh-rlhf not present")
    out = tmp_path_factory.mktemp("hh_prepared")
    prepare.main(["--source", SHARED_HH, "--subsets", "harmless-base", "--out_dir", str(out)])
    return str(out)


# SFT: demonstrations, their data files and a tiny sft.Config (test_sft, test_faults).

DEMOS = [
    {"prompt": H + "What is the capital of France?" + A,
     "response": " Paris is the capital of France."},
    {"prompt": H + "Can you help me bake bread?" + A + " Sure! What kind?" + H + "Sourdough." + A,
     "response": " You need a starter, flour, water and salt."},
    {"prompt": H + "Say hi." + A, "response": " Hi!"},
    {"prompt": H + "Name a colour." + A, "response": " Blue, like the sea on a clear day."},
]


def write_data(data_dir, train_rows, val_rows):
    os.makedirs(data_dir, exist_ok=True)
    for split, rows in (("train", train_rows), ("val", val_rows)):
        with open(os.path.join(data_dir, f"sft_{split}.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    return str(data_dir)


def sft_tiny_config(tmp_path, data_dir, **overrides):
    """A 2-layer, 64-wide model from scratch: a few ms per step on CPU."""
    cfg = dict(out_dir=str(tmp_path / "out"), data_dir=data_dir, init_from="scratch", n_layer=2,
               n_head=2, n_embd=64, block_size=128, dropout=0.0, max_prompt_tokens=48,
               max_response_tokens=24, batch_size=4, grad_accum=1, max_steps=20, lr=3e-3,
               min_lr=3e-4, warmup_steps=5, eval_interval=10, eval_examples=8, num_eval_samples=1,
               max_new_tokens=4, device="cpu")
    cfg.update(overrides)
    return sft.Config(**cfg)


# Reward model: synthetic preferences, JSONL files, a tiny reward.Config
# (test_reward, test_faults, test_distributed).

REWARD_TINY = dict(n_layer=2, n_head=2, n_embd=64, block_size=64, max_prompt_tokens=16,
                   max_response_tokens=24)
WORDS = ("apple river stone cloud green table music paper light window garden yellow horse street "
         "summer silver bread candle forest letter").split()


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return str(path)


def synthetic_preferences(n, seed, marker="banana"):
    """The chosen response contains `marker` somewhere, the rejected one never;
    both random words."""
    rng = random.Random(seed)
    words = lambda k: " ".join(rng.choice(WORDS) for _ in range(k))
    rows = []
    for _ in range(n):
        chosen = words(rng.randint(3, 8)).split()
        chosen.insert(rng.randint(0, len(chosen)), marker)
        rows.append({"prompt": f"\n\nHuman: say {words(2)}\n\nAssistant:",
                     "chosen": " " + " ".join(chosen), "rejected": " " + words(rng.randint(3, 9))})
    return rows


def reward_tiny_config(tmp_path, **kw):
    return reward.Config(**{**REWARD_TINY, "out_dir": str(tmp_path / "out"),
                            "data_dir": str(tmp_path), "init_from": "scratch", "device": "cpu",
                            "eval_interval": 10, "log_interval": 10, "batch_size": 8,
                            "grad_accum": 1, "lr": 1e-3, "warmup_steps": 5, **kw})


# PPO: the prompt fixtures and a tiny ppo.Config (test_ppo,
# test_ppo_wiring, test_faults, test_distributed).

PPO_FIXTURES = os.path.join(REPO, "tests", "fixtures", "ppo")
PPO_TINY = dict(n_layer=1, n_head=2, n_embd=32, block_size=128, max_prompt_tokens=48,
                max_new_tokens=8)


def ppo_tiny_config(tmp_path, **kw):
    return ppo.Config(**{**PPO_TINY, "out_dir": str(tmp_path / "out"), "data_dir": PPO_FIXTURES,
                         "sft_ckpt": "scratch", "reward_ckpt": "scratch", "device": "cpu",
                         "iters": 2, "batch_size": 8, "minibatch_size": 4, "noptepochs": 2,
                         "eval_interval": 1, "eval_prompts": 4, "sample_every": 1, "n_samples": 1,
                         "lr": 1e-3, "warmup_iters": 1, **kw})


# PPO rollout case: tiny models, one deterministic rollout, ragged
# responses (test_ppo_wiring, test_distributed).

ROLLOUT_SHAPE = dict(n_layer=1, n_head=2, n_embd=32, block_size=64)
GAMMA, LAM, KL_COEF, TEMPERATURE = 0.9, 0.7, 0.3, 0.8  # none of them 1 (or 0): a swapped pair shows
PROMPT_LENGTHS = (3, 7, 1, 5, 6, 2)  # left padding of up to 6 columns


def eos_prone_policy(seed, strength=3.5):
    """A random tiny GPT whose responses end early, at random lengths. A random GPT samples EOS once
    in ~50k tokens; here EOS's embedding (tied to the output layer) points along the final
    LayerNorm's bias, so its logit is ~strength * (1 + noise) against ~0 for every other token."""
    torch.manual_seed(seed)
    policy = GPT(GPTConfig(**ROLLOUT_SHAPE))
    with torch.no_grad():
        u = torch.randn(ROLLOUT_SHAPE["n_embd"])
        u /= u.norm()
        policy.transformer.ln_f.bias.copy_(u)
        policy.transformer.wte.weight[EOS] = strength * u
    return policy


def perturbed(policy, seed, scale=0.2):
    """A copy of `policy` with noise on its transformer blocks: the reference policy, so the KL
    is not 0."""
    torch.manual_seed(seed)
    ref = copy.deepcopy(policy)
    with torch.no_grad():
        for p in ref.transformer.h.parameters():
            p.add_(scale * torch.randn_like(p))
    return ref


def score_fn(queries, query_mask, responses, response_mask):
    """Programmatic reward: sum of (token id mod 7) over the response / 10 - 1, a different
    score per row."""
    return (responses % 7 * response_mask).sum(1).float() / 10 - 1


def rollout_case(prompt_lengths=PROMPT_LENGTHS):
    """Models, left-padded prompts and one deterministic rollout of up to 8 tokens
    at temperature 0.8."""
    policy = eos_prone_policy(seed=0)
    ref_policy = perturbed(policy, seed=1)
    torch.manual_seed(2)
    critic = ScalarGPT(GPTConfig(**ROLLOUT_SHAPE))
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, EOS, (n,), generator=g).tolist() for n in prompt_lengths]
    queries, query_mask = pad_left(prompts)  # (B, P)
    cfg = ppo.Config(**ROLLOUT_SHAPE, max_new_tokens=8, temperature=TEMPERATURE, gamma=GAMMA,
                     lam=LAM)
    batch, stats = ppo.rollout(ppo_models(policy, ref_policy, critic, reward_fn=score_fn), queries,
                               query_mask, cfg, KL_COEF, generator=torch.Generator().manual_seed(0))
    return dict(policy=policy, ref_policy=ref_policy, critic=critic, prompts=prompts, cfg=cfg,
                batch=batch, stats=stats)


# Sampling and PPO against references written in the tests: six prompts of 1-6 tokens, an
# EOS-prone policy, a reward_fn that records its arguments, gradients by autograd
# (test_lib, test_ppo, test_sft).

PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12, 13], [14], [15, 16, 17, 18], [19, 20],
           [21, 22, 23, 24, 25]]


class GradRecorder:
    """Stands in for the optimizer: keeps the gradient of each step instead of applying it."""

    def __init__(self, params):
        self.params, self.grads = list(params), []

    def step(self):
        self.grads.append([None if p.grad is None else p.grad.clone() for p in self.params])

    def zero_grad(self, set_to_none=True):
        for p in self.params:
            p.grad = None


def ragged_mask(lengths, T):
    """(B, T) float mask: row b is 1 on its first lengths[b] columns."""
    return (torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]).float()


def ragged_policy(seed=0, strength=4.0):
    """eos_prone_policy (above) in eval mode: responses of mixed lengths, some without EOS."""
    return eos_prone_policy(seed, strength).eval()


def scalar_model(seed):
    """A tiny ScalarGPT whose outputs differ clearly from position to position (scores
    of order 1)."""
    torch.manual_seed(seed)
    model = ScalarGPT(GPTConfig(**ROLLOUT_SHAPE))
    torch.nn.init.normal_(model.score_head.weight, std=1.0)
    return model.eval()


def hand_length(response):
    """Tokens up to and including the first EOS (all of them without one)."""
    return response.index(EOS) + 1 if EOS in response else len(response)


def last_output(model, tokens):
    """The model's output at the last position of one unpadded sequence."""
    return model(torch.tensor([tokens]))[0, -1]


class RewardRecorder:
    """A reward_fn that keeps its arguments and scores sum(token id mod 5) over
    the response mask."""

    def __init__(self):
        self.calls = []

    def __call__(self, queries, query_mask, responses, response_mask):
        self.calls.append((queries, query_mask, responses, response_mask))
        return (responses % 5 * response_mask).sum(1)  # (B,), long: sample_and_score makes it float


class NoSyncRecorder:
    """Stands in for lib.ddp.no_sync: records which modules and `enabled` each micro-batch
    was run with."""

    def __init__(self):
        self.calls = []

    @contextlib.contextmanager
    def __call__(self, *modules, enabled=True):
        self.calls.append((modules, enabled))
        yield


def gradients(loss, params):
    """d loss / d params by autograd, zeros for the parameters the loss does not use."""
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]


def assert_close_grads(got, expected):
    """Each nonzero expected gradient within 1e-4 relative error (a missing gradient, None,
    counts as 0)."""
    got = [torch.zeros_like(e) if g is None else g for g, e in zip(got, expected)]
    error = max(((g - e).norm() / e.norm().clamp(min=1e-12)).item()
                for g, e in zip(got, expected) if e.norm() > 0)
    print(f"max relative gradient error {error:.2e}")
    assert error < 1e-4


# Tracking: metrics.jsonl and TensorBoard's events as {name: [(step, value),
# ...]} (test_tracking, test_pipeline).

def tensorboard_scalars(log_dir):
    """{tag: [(step, value), ...]} read back from the event files with TensorBoard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(log_dir))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)]
            for tag in events.Tags()["scalars"]}


def metrics_by_name(path):
    """The numeric columns of metrics.jsonl as {name: [(step, value), ...]}."""
    out = {}
    for row in read_metrics(path):
        for k, v in row.items():
            if k != "step" and isinstance(v, float):
                out.setdefault(k, []).append((row["step"], v))
    return out
