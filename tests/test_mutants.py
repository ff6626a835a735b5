"""Tests written for the mutants that survived bench/mutation.sh (mutmut over the math and the stage loops of
ppo.py, reward.py and sft.py, and the code they share in lib/responses.py and lib/ddp.py): each checks one property
of a function against a reference computed here by hand (unpadded forwards one sequence at a time, Python loops,
numpy), on tiny models, in well under a second."""
import contextlib
import math
import time

import numpy as np
import pytest
import torch

import lib.ddp
import lib.responses
import ppo
import sft
from conftest import eos_prone_policy as shared_eos_prone_policy
from lib.tokens import EOS, pad_left, pad_right
from model import GPT, GPTConfig, ScalarGPT, token_logprobs

SHAPE = dict(n_layer=1, n_head=2, n_embd=32, block_size=64)
PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12, 13], [14], [15, 16, 17, 18], [19, 20], [21, 22, 23, 24, 25]]


def eos_prone_policy(seed=0, strength=4.0):
    """conftest's EOS-prone tiny GPT (responses of mixed lengths, some without EOS), in eval mode."""
    return shared_eos_prone_policy(seed, strength).eval()


def scalar_model(seed, **kw):
    """A tiny ScalarGPT whose outputs differ clearly from position to position (scores of order 1)."""
    torch.manual_seed(seed)
    model = ScalarGPT(GPTConfig(**SHAPE, **kw))
    torch.nn.init.normal_(model.score_head.weight, std=1.0)
    return model.eval()


def hand_length(response):
    """Tokens up to and including the first EOS (all of them without one)."""
    return response.index(EOS) + 1 if EOS in response else len(response)


def last_output(model, tokens):
    """The model's output at the last position of one unpadded sequence."""
    return model(torch.tensor([tokens]))[0, -1]


class Recorder:
    """A reward_fn that keeps its arguments and scores sum(token id mod 5) over the response mask."""

    def __init__(self):
        self.calls = []

    def __call__(self, queries, query_mask, responses, response_mask):
        self.calls.append((queries, query_mask, responses, response_mask))
        return (responses % 5 * response_mask).sum(1)  # (B,), long: sample_and_score makes it float


def sample(max_new_tokens, temperature=1.0, seed=0, reward_model=None, reward_fn=None, policy=None):
    """lib.responses.sample_and_score on PROMPTS (left-padded) with a generator seeded `seed`."""
    queries, query_mask = pad_left(PROMPTS)
    policy = eos_prone_policy() if policy is None else policy
    return lib.responses.sample_and_score(policy, queries, query_mask, max_new_tokens, temperature,
                                          torch.Generator().manual_seed(seed), reward_model=reward_model,
                                          reward_fn=reward_fn)


# ---------------------------------------------------------------------------------------------- sample_and_score

def test_samples_are_those_of_generate_at_the_given_temperature_with_the_given_generator():
    """The responses are policy.generate's at the temperature passed (0.7, not the default 1; the default is 1)
    with EOS as the stop token and the generator passed in: the same seed gives the same responses, another seed
    others."""
    policy = eos_prone_policy()
    queries, query_mask = pad_left(PROMPTS)
    batch = sample(10, 0.7, seed=3, reward_fn=Recorder(), policy=policy)
    reference = policy.generate(queries, 10, temperature=0.7, eos_token_id=EOS, attention_mask=query_mask,
                                generator=torch.Generator().manual_seed(3))
    assert torch.equal(batch["ids"], reference)
    again = sample(10, 0.7, seed=3, reward_fn=Recorder(), policy=policy)
    assert torch.equal(again["ids"], batch["ids"])
    other = sample(10, 0.7, seed=4, reward_fn=Recorder(), policy=policy)
    assert not torch.equal(other["ids"][:, :batch["ids"].size(1)], batch["ids"][:, :other["ids"].size(1)])
    default = lib.responses.sample_and_score(policy, queries, query_mask, 10, reward_fn=Recorder(),
                                             generator=torch.Generator().manual_seed(3))  # temperature: default
    reference = policy.generate(queries, 10, temperature=1.0, eos_token_id=EOS, attention_mask=query_mask,
                                generator=torch.Generator().manual_seed(3))
    assert torch.equal(default["ids"], reference)


def test_sampled_responses_are_only_eos_after_their_first_eos_and_end_when_all_rows_have_one():
    """Generation stops at EOS: after a row's first EOS come only EOS (padding), and with every row ended early
    the responses are shorter than max_new_tokens. has_eos, the response mask and the attention mask follow a
    Python scan of each row."""
    batch = sample(20, 1.0, seed=0, reward_fn=Recorder(), policy=eos_prone_policy(seed=1, strength=6.0))
    responses = batch["responses"].tolist()
    lengths = [hand_length(r) for r in responses]
    print(f"response lengths {lengths} of {len(responses[0])}")
    assert all(EOS in r for r in responses) and len(responses[0]) < 20, "all rows ended early"
    assert len(set(lengths)) > 1
    for r, n in zip(responses, lengths):
        assert r[n:] == [EOS] * (len(r) - n)
    mask = [[1] * n + [0] * (len(r) - n) for r, n in zip(responses, lengths)]
    assert batch["response_mask"].tolist() == [[bool(m) for m in row] for row in mask]
    assert batch["has_eos"].tolist() == [True] * len(PROMPTS)
    queries, query_mask = pad_left(PROMPTS)
    assert batch["attention_mask"].tolist() == [q + m for q, m in zip(query_mask.tolist(), mask)]
    assert batch["attention_mask"].dtype == query_mask.dtype
    assert torch.equal(batch["queries"], queries) and torch.equal(batch["responses"], batch["ids"][:, queries.size(1):])


def test_has_eos_is_true_exactly_for_the_responses_that_contain_one():
    batch = sample(12, 1.0, seed=0, reward_fn=Recorder())
    has_eos = [EOS in r for r in batch["responses"].tolist()]
    print(f"has_eos {has_eos}")
    assert any(has_eos) and not all(has_eos), "the test needs responses with and without EOS"
    assert batch["has_eos"].tolist() == has_eos


def test_reward_fn_gets_the_queries_their_mask_the_responses_and_the_response_mask():
    recorder = Recorder()
    batch = sample(12, 1.0, seed=0, reward_fn=recorder)
    queries, query_mask = pad_left(PROMPTS)
    (q, qm, r, rm), = recorder.calls
    assert torch.equal(q, queries) and torch.equal(qm, query_mask)
    assert torch.equal(r, batch["ids"][:, queries.size(1):])
    assert rm.tolist() == [[t < hand_length(row) for t in range(len(row))] for row in r.tolist()]
    expected = [float(sum(t % 5 for t in row[:hand_length(row)])) for row in r.tolist()]
    assert batch["scores"].dtype == torch.float32 and batch["scores"].tolist() == expected


def test_reward_model_scores_each_response_at_its_eos_appended_where_missing():
    """Without reward_fn the score of a row is the reward model's output at the EOS ending prompt + response,
    an EOS appended to the responses cut at max_new_tokens: one unpadded forward per row."""
    rm = scalar_model(seed=9)
    batch = sample(12, 1.0, seed=0, reward_model=rm)
    assert batch["has_eos"].any() and not batch["has_eos"].all()
    expected = []
    with torch.no_grad():
        for prompt, response in zip(PROMPTS, batch["responses"].tolist()):
            y = response[:hand_length(response)]
            expected.append(last_output(rm, prompt + y + ([] if EOS in y else [EOS])).item())
    print(f"scores {batch['scores'].tolist()} hand {expected}")
    assert batch["scores"].tolist() == pytest.approx(expected, abs=1e-5)


# ---------------------------------------------------------------------------------------------- rollout

def perturbed(model, seed, scale):
    """A copy of `model` with noise on every parameter."""
    torch.manual_seed(seed)
    other = type(model)(model.config)
    other.load_state_dict(model.state_dict())
    with torch.no_grad():
        for p in other.parameters():
            p.add_(scale * torch.randn_like(p))
    return other.eval()


ROLLOUT = dict(max_new_tokens=12, temperature=0.8, gamma=0.9, lam=0.7)
KL_COEF = 0.3


def rollout_of(cfg, seed=0, reward_model=None, reward_fn=None):
    """ppo.rollout of the EOS-prone policy on PROMPTS against a perturbed reference and a random critic."""
    policy = eos_prone_policy()
    queries, query_mask = pad_left(PROMPTS)
    return ppo.rollout(policy, perturbed(policy, seed=1, scale=0.2), scalar_model(seed=2), reward_model, queries,
                       query_mask, cfg, KL_COEF, reward_fn=reward_fn, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("penalty", [0.0, 0.75])
def test_rollout_subtracts_the_missing_eos_penalty_from_exactly_the_responses_without_eos(penalty):
    """The scores, their mean (stats["score"]) and the rewards built from them (each row's summed reward is its
    score - beta * its KL) carry the penalty on the rows without EOS, and only there."""
    cfg = ppo.Config(**SHAPE, max_new_tokens=12, temperature=1.0, missing_eos_penalty=penalty)
    batch, stats = rollout_of(cfg, seed=0, reward_fn=Recorder())
    rows = batch["responses"].tolist()
    assert any(EOS in r for r in rows) and not all(EOS in r for r in rows)
    expected = [sum(t % 5 for t in r[:hand_length(r)]) - (0.0 if EOS in r else penalty) for r in rows]
    assert batch["scores"].tolist() == pytest.approx(expected, abs=1e-6)
    assert stats["score"] == pytest.approx(sum(expected) / len(expected), abs=1e-6)
    rewards = (batch["rewards"].sum(1) + KL_COEF * batch["kl"].sum(1)).tolist()
    assert rewards == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("penalty", [0.0, 0.75])
def test_evaluation_subtracts_the_missing_eos_penalty_from_exactly_the_responses_without_eos(penalty):
    """ppo.evaluate samples as rollouts do (with a generator seeded cfg.seed, in batches of batch_size) and
    applies the same penalty: eval_score is the mean of the penalised scores."""
    policy = eos_prone_policy()
    cfg = ppo.Config(**SHAPE, max_new_tokens=12, temperature=1.0, missing_eos_penalty=penalty, batch_size=4,
                     seed=0)
    metrics = ppo.evaluate(policy, perturbed(policy, seed=1, scale=0.2), None, Recorder(), PROMPTS, cfg, "cpu")
    generator, rows = torch.Generator().manual_seed(0), []
    for i in range(0, len(PROMPTS), 4):
        queries, query_mask = pad_left(PROMPTS[i:i + 4])
        rows += lib.responses.sample_responses(policy, queries, query_mask, 12, 1.0, generator)["responses"].tolist()
    assert any(EOS in r for r in rows) and not all(EOS in r for r in rows)
    expected = [sum(t % 5 for t in r[:hand_length(r)]) - (0.0 if EOS in r else penalty) for r in rows]
    assert metrics["eval_score"] == pytest.approx(sum(expected) / len(expected), abs=1e-6)


def test_rollout_generation_time_is_between_zero_and_the_time_of_the_call():
    cfg = ppo.Config(**SHAPE, max_new_tokens=3)
    t0 = time.time()
    _, stats = rollout_of(cfg, reward_fn=Recorder())
    elapsed = time.time() - t0
    assert 0 <= stats["t_generate"] <= elapsed
    assert 0 <= stats["t_forward"] and stats["t_generate"] + stats["t_forward"] <= elapsed


@pytest.fixture
def rolled():
    """One rollout of the EOS-prone policy against a perturbed reference, timed. Function-scoped on purpose:
    mutmut maps a test to the functions called while it runs, and a module-scoped fixture's calls would count
    for the first test that uses it only."""
    policy = eos_prone_policy()
    ref_policy, critic = perturbed(policy, seed=1, scale=0.2), scalar_model(seed=2)
    cfg = ppo.Config(**SHAPE, **ROLLOUT)
    queries, query_mask = pad_left(PROMPTS)
    t0 = time.time()
    batch, stats = ppo.rollout(policy, ref_policy, critic, None, queries, query_mask, cfg, KL_COEF,
                               reward_fn=Recorder(), generator=torch.Generator().manual_seed(5))
    return dict(policy=policy, ref_policy=ref_policy, critic=critic, cfg=cfg, batch=batch, stats=stats,
                elapsed=time.time() - t0)


def test_rollout_statistics_are_the_batch_means_computed_by_hand(rolled):
    """score, reward and kl: means over responses of the score and of each row's summed reward and KL; entropy:
    mean of -log pi over response tokens; explained_var: numpy's on the response tokens; resp_len: mean length up
    to and including the first EOS; eos_frac: share of responses with an EOS; the two timings add up to at most
    the time of the call. Exactly these keys."""
    batch, stats = rolled["batch"], rolled["stats"]
    rows = batch["responses"].tolist()
    lengths = [hand_length(r) for r in rows]
    assert len(set(lengths)) > 1 and not all(EOS in r for r in rows), "the test needs ragged responses, some cut"
    per_row = lambda k: [batch[k][i, :n].tolist() for i, n in enumerate(lengths)]  # each row's response tokens
    mean = lambda xs: sum(xs) / len(xs)
    tokens = lambda k: [x for row in per_row(k) for x in row]
    values, returns = np.array(tokens("values"), dtype=np.float64), np.array(tokens("returns"), dtype=np.float64)
    expected = {"score": mean(batch["scores"].tolist()), "reward": mean([sum(r) for r in per_row("rewards")]),
                "kl": mean([sum(r) for r in per_row("kl")]), "entropy": -mean(tokens("logprobs")),
                "explained_var": 1 - np.var(returns - values) / np.var(returns), "resp_len": mean(lengths),
                "eos_frac": mean([EOS in r for r in rows])}
    print({k: (round(stats[k], 5), round(float(v), 5)) for k, v in expected.items()})
    assert set(stats) == set(expected) | {"t_generate", "t_forward"}
    for k, v in expected.items():
        assert stats[k] == pytest.approx(v, abs=1e-5), k
    assert stats["t_generate"] >= 0 and stats["t_forward"] >= 0
    assert stats["t_generate"] + stats["t_forward"] <= rolled["elapsed"]


def test_rollout_samples_with_the_generator_it_is_given(rolled):
    queries, query_mask = pad_left(PROMPTS)
    reference = rolled["policy"].generate(queries, ROLLOUT["max_new_tokens"], temperature=ROLLOUT["temperature"],
                                          eos_token_id=EOS, attention_mask=query_mask,
                                          generator=torch.Generator().manual_seed(5))
    assert torch.equal(rolled["batch"]["ids"], reference)


def test_rollout_with_a_reward_model_scores_with_it():
    """No reward_fn: the scores are the reward model's, read at the EOS ending each unpadded response."""
    policy, rm = eos_prone_policy(), scalar_model(seed=9)
    queries, query_mask = pad_left(PROMPTS)
    batch, stats = ppo.rollout(policy, perturbed(policy, 1, 0.2), scalar_model(seed=2), rm, queries, query_mask,
                               ppo.Config(**SHAPE, **ROLLOUT), KL_COEF, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = [last_output(rm, p + r[:hand_length(r)] + ([] if EOS in r else [EOS])).item()
                    for p, r in zip(PROMPTS, batch["responses"].tolist())]
    assert batch["scores"].tolist() == pytest.approx(expected, abs=1e-5)
    assert stats["score"] == pytest.approx(sum(expected) / len(expected), abs=1e-5)


# ---------------------------------------------------------------------------------------------- minibatch

def test_minibatch_takes_the_rows_and_drops_only_the_columns_that_are_padding_in_all_of_them(rolled):
    """Rows [4, 2] of the rollout: the prompt columns left of the longest of their prompts and the response
    columns right of the longest of their responses are gone, every other column is kept, and n_query counts
    the prompt columns left."""
    batch = rolled["batch"]
    P = batch["queries"].size(1)
    idx = torch.tensor([4, 2])  # prompts of 2 and 1 tokens (of P = 6), responses of different lengths
    lengths = [hand_length(batch["responses"][i].tolist()) for i in idx.tolist()]
    prompt_len = max(len(PROMPTS[i]) for i in idx.tolist())
    R, first = max(lengths), P - prompt_len
    assert 0 < first and R < batch["responses"].size(1), "the test needs columns to drop on both sides"
    mb = ppo.minibatch(batch, idx)
    assert set(mb) == {"logprobs", "values", "advantages", "returns", "response_mask", "ids", "attention_mask",
                       "n_query"}
    for k in ("logprobs", "values", "advantages", "returns", "response_mask"):
        assert torch.equal(mb[k], batch[k][idx][:, :R]), k
    assert torch.equal(mb["ids"], batch["ids"][idx][:, first:P + R])
    assert torch.equal(mb["attention_mask"], batch["attention_mask"][idx][:, first:P + R])
    assert mb["n_query"] == prompt_len


# ---------------------------------------------------------------------------------------------- ppo_update

class GradRecorder:
    """Stands in for the optimizer: keeps the gradient of each step instead of applying it."""

    def __init__(self, params):
        self.params, self.grads = list(params), []

    def step(self):
        self.grads.append([torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in self.params])

    def zero_grad(self, set_to_none=True):
        for p in self.params:
            p.grad = None


PTX_LENGTHS = (7, 4, 2, 1, 1, 1)  # split in 3 pieces of 2 rows: 9, 1 and 0 predicted tokens


def ptx_batch():
    return pad_right([list(range(100 + 10 * i, 100 + 10 * i + n)) for i, n in enumerate(PTX_LENGTHS)])


def update_case(rolled):
    """The update's models: the rollout's policy and critic, moved away from it (so ratios are not 1 and values
    not the rollout's: both losses clip)."""
    policy, critic = perturbed(rolled["policy"], seed=3, scale=0.05), perturbed(rolled["critic"], seed=4, scale=0.5)
    return policy, critic


def reference_loss(policy, critic, batch, rows, cfg, ptx=None):
    """The PPO loss of the rows as one batch (no micro-batches, no trimming): token means over all of them."""
    P = batch["queries"].size(1)
    ids, attention_mask, mask = batch["ids"][rows], batch["attention_mask"][rows], batch["response_mask"][rows]
    logprobs = lib.responses.policy_logprobs(policy, ids, attention_mask, P, cfg.temperature)
    values = ppo.critic_values(critic, ids, attention_mask, P)
    pg, pg_clipfrac, approx_kl = ppo.ppo_policy_loss(logprobs, batch["logprobs"][rows], batch["advantages"][rows],
                                                     mask, cfg.cliprange)
    vf, vf_clipfrac = ppo.ppo_value_loss(values, batch["values"][rows], batch["returns"][rows], mask,
                                         cfg.cliprange_value)
    loss = pg + cfg.vf_coef * vf
    stats = dict(pg_loss=pg.item(), vf_loss=vf.item(), pg_clipfrac=pg_clipfrac.item(), vf_clipfrac=vf_clipfrac.item(),
                 approx_kl=approx_kl.item())
    if ptx is not None:
        ptx_loss = ppo.lm_loss(policy, *ptx)
        loss = loss + cfg.ptx_coef * ptx_loss
        stats["ptx_loss"] = ptx_loss.item()
    return loss, stats


def gradients(loss, params):
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]


def assert_close_grads(got, expected):
    error = max(((g - e).norm() / e.norm().clamp(min=1e-12)).item() for g, e in zip(got, expected) if e.norm() > 0)
    print(f"max relative gradient error {error:.2e}")
    assert error < 1e-4


def test_update_step_in_pieces_is_the_gradient_and_statistics_of_the_whole_minibatch_with_ptx(rolled):
    """One optimizer step over all 6 rollouts in 3 micro-batches, PPO-ptx on a batch of 6 texts split alike into
    pieces of 9, 1 and 0 predicted tokens: the gradient is that of pg_loss + vf_coef vf_loss + ptx_coef lm_loss
    over the whole minibatch and the whole ptx batch, and each logged statistic is its whole-batch value."""
    batch = rolled["batch"]
    policy, critic = update_case(rolled)
    cfg = ppo.Config(**SHAPE, **ROLLOUT, batch_size=6, minibatch_size=6, grad_accum=3, noptepochs=1,
                     grad_clip=0.0, vf_coef=0.3, ptx_coef=0.7)
    params = list(policy.parameters()) + list(critic.parameters())
    recorder = GradRecorder(params)
    ptx = ptx_batch()
    stats = ppo.ppo_update(policy, critic, recorder, batch, cfg, iter([ptx]), torch.Generator().manual_seed(0))
    loss, expected = reference_loss(policy, critic, batch, torch.arange(6), cfg, ptx)
    print({k: (round(stats[k], 6), round(v, 6)) for k, v in expected.items()})
    assert 0 < expected["pg_clipfrac"] < 1 and 0 < expected["vf_clipfrac"] < 1, "the test needs both losses clipped"
    assert len(recorder.grads) == 1
    assert_close_grads(recorder.grads[0], gradients(loss, params))
    assert set(stats) == set(expected)
    for k, v in expected.items():
        assert stats[k] == pytest.approx(v, rel=1e-5, abs=1e-7), k


def test_update_minibatches_follow_the_generators_permutation_and_statistics_average_over_steps(rolled):
    """noptepochs 1, minibatches of 3 of the 6 rollouts: step k takes rows randperm(6, generator)[3k:3k+3] (the
    global RNG, seeded otherwise, plays no part), and the statistics are the mean over the two steps."""
    batch = rolled["batch"]
    policy, critic = update_case(rolled)
    cfg = ppo.Config(**SHAPE, **ROLLOUT, batch_size=6, minibatch_size=3, noptepochs=1, grad_clip=0.0)
    params = list(policy.parameters()) + list(critic.parameters())
    torch.manual_seed(1234)
    recorder = GradRecorder(params)
    stats = ppo.ppo_update(policy, critic, recorder, batch, cfg, generator=torch.Generator().manual_seed(8))
    order = torch.randperm(6, generator=torch.Generator().manual_seed(8))
    assert len(recorder.grads) == 2
    step_stats = []
    for k, rows in enumerate((order[:3], order[3:])):
        loss, s = reference_loss(policy, critic, batch, rows, cfg)
        assert_close_grads(recorder.grads[k], gradients(loss, params))
        step_stats.append(s)
    for key in step_stats[0]:
        assert stats[key] == pytest.approx((step_stats[0][key] + step_stats[1][key]) / 2, rel=1e-5, abs=1e-7), key


def test_update_clips_policy_and_critic_gradients_separately_and_logs_the_policy_norm(rolled):
    """grad_clip 1e-3, far below both gradient norms: each network's applied gradient is its own gradient scaled
    to norm 1e-3 (not a common scale), and grad_norm is the policy's norm before clipping."""
    batch = rolled["batch"]
    policy, critic = update_case(rolled)
    cfg = ppo.Config(**SHAPE, **ROLLOUT, batch_size=6, minibatch_size=6, noptepochs=1, grad_clip=1e-3)
    n_policy = len(list(policy.parameters()))
    params = list(policy.parameters()) + list(critic.parameters())
    recorder = GradRecorder(params)
    stats = ppo.ppo_update(policy, critic, recorder, batch, cfg, generator=torch.Generator().manual_seed(0))
    loss, _ = reference_loss(policy, critic, batch, torch.arange(6), cfg)
    expected = gradients(loss, params)
    norm = lambda gs: math.sqrt(sum((g.double() ** 2).sum().item() for g in gs))
    norms = norm(expected[:n_policy]), norm(expected[n_policy:])
    print(f"gradient norms: policy {norms[0]:.3e} critic {norms[1]:.3e}")
    assert min(norms) > 1e-2
    assert stats["grad_norm"] == pytest.approx(norms[0], rel=1e-4)
    for part, n in ((slice(0, n_policy), norms[0]), (slice(n_policy, None), norms[1])):
        assert_close_grads(recorder.grads[0][part], [g * 1e-3 / n for g in expected[part]])


def test_update_on_a_minibatch_of_a_single_one_token_response_applies_its_whole_gradient(rolled):
    """minibatch_size 1 and a response that is EOS alone: the row holds all the step's tokens (share 1), so
    the gradient is that of the row's own loss."""
    batch = {k: v[2:3] for k, v in rolled["batch"].items()}
    assert int(batch["response_mask"].sum()) == 1, "the test needs row 2 to be a one-token response"
    policy, critic = update_case(rolled)
    cfg = ppo.Config(**SHAPE, **ROLLOUT, batch_size=1, minibatch_size=1, noptepochs=1, grad_clip=0.0)
    params = list(policy.parameters()) + list(critic.parameters())
    recorder = GradRecorder(params)
    ppo.ppo_update(policy, critic, recorder, batch, cfg, generator=torch.Generator())
    loss, _ = reference_loss(policy, critic, batch, torch.arange(1), cfg)
    assert_close_grads(recorder.grads[0], gradients(loss, params))


class NoSyncRecorder:
    """Stands in for lib.ddp.no_sync: records which modules and `enabled` each micro-batch was run with."""

    def __init__(self):
        self.calls = []

    @contextlib.contextmanager
    def __call__(self, *modules, enabled=True):
        self.calls.append((modules, enabled))
        yield


def test_update_syncs_ddp_gradients_once_after_the_last_micro_batch(rolled, monkeypatch):
    batch = rolled["batch"]
    policy, critic = update_case(rolled)
    recorder = NoSyncRecorder()
    monkeypatch.setattr(ppo, "no_sync", recorder)
    cfg = ppo.Config(**SHAPE, **ROLLOUT, batch_size=6, minibatch_size=6, grad_accum=3, noptepochs=1)
    ppo.ppo_update(policy, critic, GradRecorder(policy.parameters()), batch, cfg, generator=torch.Generator())
    assert len(recorder.calls) == 3
    assert all(modules[0] is policy and modules[1] is critic and len(modules) == 2 for modules, _ in recorder.calls)
    assert [enabled for _, enabled in recorder.calls] == [True, True, False]


def test_update_weights_its_losses_by_step_total_of_the_steps_response_and_ptx_tokens(rolled, monkeypatch):
    """Under torchrun a step's token counts are lib.ddp.step_total's (all ranks' / world_size): ppo_update asks it
    for the minibatch's response tokens and the ptx batch's predicted tokens, once per step, and divides by what
    it returns. A stand-in returning twice the local count halves the whole step's gradient."""
    batch = rolled["batch"]
    policy, critic = update_case(rolled)
    calls = []
    monkeypatch.setattr(ppo, "step_total", lambda n: calls.append(n) or 2.0 * n)
    cfg = ppo.Config(**SHAPE, **ROLLOUT, batch_size=6, minibatch_size=6, grad_accum=3, noptepochs=1, grad_clip=0.0,
                     vf_coef=0.3, ptx_coef=0.7)
    params = list(policy.parameters()) + list(critic.parameters())
    recorder = GradRecorder(params)
    ptx = ptx_batch()
    ppo.ppo_update(policy, critic, recorder, batch, cfg, iter([ptx]), torch.Generator().manual_seed(0))
    assert calls == [int(batch["response_mask"].sum()), sum(n - 1 for n in PTX_LENGTHS)]
    loss, _ = reference_loss(policy, critic, batch, torch.arange(6), cfg, ptx)
    assert_close_grads(recorder.grads[0], [g / 2 for g in gradients(loss, params)])


# ---------------------------------------------------------------------------------------------- math edge cases

def test_policy_loss_ratio_is_new_over_old_probability_with_nonzero_old_logprobs():
    """The hand-computed clipping cases with old log-probabilities that are not 0: ratio = exp(new - old)."""
    ratios = torch.tensor([[1.5, 0.5, 1.5, 0.5, 1.1]])
    advantages = torch.tensor([[2.0, -1.0, -1.0, 3.0, 1.0]])
    old = torch.tensor([[-2.0, -0.3, -1.1, -4.0, -0.7]])
    loss, clipfrac, approx_kl = ppo.ppo_policy_loss(old + ratios.log(), old, advantages, torch.ones(1, 5), 0.2)
    objective = [1.2 * 2.0, 0.8 * -1.0, 1.5 * -1.0, 0.5 * 3.0, 1.1 * 1.0]  # min(r A, clip(r) A), see test_ppo.py
    assert loss.item() == pytest.approx(-sum(objective) / 5, abs=1e-6)
    assert clipfrac.item() == pytest.approx(2 / 5)
    assert approx_kl.item() == pytest.approx(sum(r - 1 - math.log(r) for r in ratios[0].tolist()) / 5, abs=1e-6)


def test_value_loss_clips_values_within_cliprange_of_nonzero_old_values_on_both_sides():
    """V_clip = V_old + clip(V - V_old, -0.2, 0.2) around old values that are not 0; the loss takes the larger
    squared error. Entry 1 moved down too far and its clipped error is the larger, entry 5 moved up too far and
    likewise; entries 2 and 4 moved too far but the unclipped error is larger; entry 3 moved within the range."""
    old = torch.tensor([[1.0, -1.0, 2.0, 0.5, 0.5]])
    values = torch.tensor([[0.5, -0.3, 2.1, 1.5, 1.0]])
    returns = torch.tensor([[0.0, -2.0, 5.0, 0.0, 3.0]])
    loss, clipfrac = ppo.ppo_value_loss(values, old, returns, torch.ones(1, 5), cliprange_value=0.2)
    # clipped values 0.8, -0.8, 2.1, 0.7, 0.7: max((V - R)^2, (V_clip - R)^2)
    errors = [max(0.5 ** 2, 0.8 ** 2), max(1.7 ** 2, 1.2 ** 2), 2.9 ** 2, max(1.5 ** 2, 0.7 ** 2),
              max(2.0 ** 2, 2.3 ** 2)]
    assert loss.item() == pytest.approx(0.5 * sum(errors) / 5, abs=1e-5)
    assert clipfrac.item() == pytest.approx(2 / 5)


def test_kl_reward_takes_scores_of_another_float_dtype():
    """A float64 score (or bf16 log-probabilities) is added in the rewards' dtype, not refused."""
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    logprobs, ref_logprobs = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, -0.5, -0.5]]), torch.full((2, 3), -1.0)
    rewards, _ = ppo.compute_rewards(torch.tensor([1.0, 2.0], dtype=torch.float64), logprobs, ref_logprobs, mask, 0.5)
    assert rewards.dtype == torch.float32
    assert rewards.tolist() == [[0.0, 1.5, 0.0], [-0.25, -0.25, 1.75]]


def test_last_token_index_stays_on_the_masks_device():
    """The positions are made on the mask's device (the meta device stands in for a GPU here)."""
    mask = torch.tensor([[1, 1, 0], [0, 1, 1]])
    assert lib.responses.last_token_index(mask.to("meta")).device.type == "meta"
    assert lib.responses.last_token_index(mask).tolist() == [1, 2]


def test_update_stops_on_a_non_finite_loss_naming_the_iteration(rolled):
    """NaN advantages make the loss NaN: FloatingPointError before any optimizer step, naming "the PPO loss" and
    the iteration passed in ("?" when none is)."""
    batch = {**rolled["batch"], "advantages": torch.full_like(rolled["batch"]["advantages"], float("nan"))}
    policy, critic = update_case(rolled)
    cfg = ppo.Config(**SHAPE, **ROLLOUT, batch_size=6, minibatch_size=6, noptepochs=1)
    recorder = GradRecorder(policy.parameters())
    with pytest.raises(FloatingPointError, match=r"^the PPO loss is NaN or inf at step 7:"):
        ppo.ppo_update(policy, critic, recorder, batch, cfg, generator=torch.Generator(), iteration=7)
    with pytest.raises(FloatingPointError, match=r"^the PPO loss is NaN or inf at step \?:"):
        ppo.ppo_update(policy, critic, recorder, batch, cfg, generator=torch.Generator())
    assert recorder.grads == []


def test_gae_of_one_token_responses_is_reward_minus_value():
    """T = 1 (max_new_tokens 1): A = r - V (nothing after the last token), returns = r."""
    rewards, values = torch.tensor([[0.5], [-1.0]]), torch.tensor([[0.2], [0.3]])
    advantages, returns = ppo.compute_gae(rewards, values, torch.ones(2, 1), gamma=0.9, lam=0.7)
    assert advantages[:, 0].tolist() == pytest.approx([0.3, -1.3])
    assert returns[:, 0].tolist() == pytest.approx([0.5, -1.0])


def test_whiten_of_equal_values_is_zero_not_nan():
    """All advantages equal (variance 0): whitened to 0 (the eps keeps 1/sqrt finite), padding 0."""
    x, mask = torch.full((2, 3), 0.7), torch.tensor([[1, 1, 0], [1, 1, 1]])
    assert ppo.whiten(x, mask).tolist() == [[0.0] * 3] * 2


def test_explained_variance_of_returns_with_small_variance_matches_numpy():
    """Returns of variance ~0.01: still 1 - Var[returns - values] / Var[returns] (the floor is only against 0)."""
    torch.manual_seed(0)
    returns = 0.1 * torch.randn(3, 5)
    values = returns + 0.05 * torch.randn(3, 5)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0]])
    r, v = returns[mask.bool()].double().numpy(), values[mask.bool()].double().numpy()
    expected = 1 - np.var(r - v) / np.var(r)
    assert 0.5 < expected < 0.95
    assert ppo.explained_variance(values, returns, mask).item() == pytest.approx(expected, abs=1e-5)


# ---------------------------------------------------------------------------------------------- lib.ddp

def test_step_total_on_two_ranks_is_the_items_of_both_over_the_world_size(monkeypatch):
    """A stand-in second rank holding 5 items: step_total(3) is (3 + 5) / 2, the sum all-reduced as a float;
    with no item on either rank it is 1 / 2 (never a division by 0)."""
    sent = []
    monkeypatch.setattr(lib.ddp, "get_world_size", lambda: 2)
    monkeypatch.setattr(lib.ddp, "all_reduce_sum", lambda x: sent.append(x) or x + 5.0)
    assert lib.ddp.step_total(3) == 4.0
    assert sent == [3.0] and type(sent[0]) is float
    monkeypatch.setattr(lib.ddp, "all_reduce_sum", lambda x: x)
    assert lib.ddp.step_total(0) == 0.5


# ---------------------------------------------------------------------------------------------- sft

def test_sft_loss_of_a_single_response_token_is_its_nll():
    torch.manual_seed(0)
    logits, targets = torch.randn(2, 3, 7), torch.tensor([[1, 2, 3], [4, 5, 6]])
    mask = torch.tensor([[0, 0, 0], [0, 1, 0]])
    expected = -torch.log_softmax(logits[1, 1].double(), -1)[5].item()
    assert sft.sft_loss(token_logprobs(logits, targets), mask).item() == pytest.approx(expected, abs=1e-6)


def sft_case():
    torch.manual_seed(3)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=32, vocab_size=EOS + 1))
    examples = [(torch.randint(0, EOS, (n,)).tolist() + [EOS], p) for n, p in ((12, 5), (7, 3), (20, 11), (9, 8))]
    return model, examples


def whole_batch_loss_and_grads(model, examples):
    x, y, loss_mask = sft.collate(examples)
    loss = sft.sft_loss(token_logprobs(model(x), y), loss_mask)
    return loss.item(), gradients(loss, list(model.parameters()))


def test_sft_step_of_a_single_response_token_is_that_tokens_nll():
    """One micro-batch whose only response token is the EOS after the prompt: the step's loss is its NLL."""
    model, _ = sft_case()
    example = ([3, 4, 5, EOS], 3)  # prompt of 3 tokens, response = EOS alone
    loss = sft.accumulate_gradients(model.transformer, model, [sft.collate([example])],
                                    contextlib.nullcontext())
    with torch.no_grad():
        expected = -torch.log_softmax(model(torch.tensor([[3, 4, 5]]))[0, -1].double(), -1)[EOS].item()
    assert loss == pytest.approx(expected, abs=1e-5)


def test_sft_step_on_one_of_two_identical_ranks_is_the_single_process_step(monkeypatch):
    """Under torchrun each rank weighs its micro-batches by world_size / (tokens of all ranks), and DDP averages
    the ranks' gradients: with a second rank holding the same micro-batches (all_reduce_sum doubles, world 2),
    this rank's gradient and the returned loss are those of one process running the step alone."""
    model, examples = sft_case()
    micro = [sft.collate(examples[:1]), sft.collate(examples[1:])]
    expected_loss, expected_grads = whole_batch_loss_and_grads(model, examples)
    for module in (sft, lib.ddp):  # sft's loss over the ranks, and lib.ddp.step_total's token count
        monkeypatch.setattr(module, "get_world_size", lambda: 2)
        monkeypatch.setattr(module, "all_reduce_sum", lambda x: 2 * x)
    loss = sft.accumulate_gradients(model.transformer, model, micro, contextlib.nullcontext())
    assert loss == pytest.approx(expected_loss, abs=1e-5)
    assert_close_grads([p.grad for p in model.parameters()], expected_grads)


def test_sft_step_syncs_ddp_gradients_once_after_the_last_micro_batch(monkeypatch):
    model, examples = sft_case()
    recorder = NoSyncRecorder()
    monkeypatch.setattr(sft, "no_sync", recorder)
    micro = [sft.collate(examples[:1]), sft.collate(examples[1:3]), sft.collate(examples[3:])]
    sft.accumulate_gradients(model.transformer, model, micro, contextlib.nullcontext())
    assert recorder.calls == [((model.transformer,), True), ((model.transformer,), True), ((model.transformer,), False)]
