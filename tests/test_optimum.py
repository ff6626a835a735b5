"""Does the project's PPO solve the objective it claims? In a micro-world small enough to enumerate
every response (4 tokens, responses of 2 tokens, 2 prompts: 16 responses each), the KL-regularised
objective of InstructGPT eq. (2), max E[r(x, y)] - beta KL(pi || pi_ref), has the exact optimum
    pi*(y|x) = pi_ref(y|x) exp(r(x, y) / beta) / Z(x).
A tiny policy trained with ppo.py's own rollout (sampling, per-token KL-shaped rewards, GAE) and
update (clipped losses) must end close to it, by KL(pi || pi*) computed exactly; and the per-token
KL the rollout sums must equal the sequence KL the objective uses. (Planted errors: a flipped KL
sign ends at KL 2.0 from pi*, beta applied twice at 0.18, no KL penalty at 1.6; the method as
written at 0.001.)"""
import copy
import dataclasses
import itertools

import torch

import ppo
from conftest import ppo_models
from lib.responses import policy_logprobs
from model import GPT, GPTConfig, ScalarGPT

V, R, BETA = 4, 2, 0.5  # tokens, response length, the KL coefficient beta
SHAPE = GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=8, vocab_size=V)
PROMPTS = torch.tensor([[0], [1]])  # two one-token prompts
RESPONSES = torch.tensor(list(itertools.product(range(V), repeat=R)))  # (16, R): every response


def reward_table(seed=0):
    """r(x, y) for every prompt and response, (2, 16), uniform in [-1, 1]: a reward with no
    structure to exploit."""
    return torch.rand(len(PROMPTS), len(RESPONSES),
                      generator=torch.Generator().manual_seed(seed)) * 2 - 1


def response_index(responses):
    """(B, R) tokens -> (B,) index into RESPONSES (base-V digits)."""
    return sum(responses[:, t] * V ** (R - 1 - t) for t in range(R))


@torch.no_grad()
def log_pi(policy):
    """log pi(y|x) of every response to every prompt, (2, 16), by the
    project's policy_logprobs (summed)."""
    ids = torch.cat([PROMPTS.repeat_interleave(len(RESPONSES), 0),
                     RESPONSES.repeat(len(PROMPTS), 1)], 1)  # (32, 3)
    logprobs = policy_logprobs(policy.eval(), ids, torch.ones_like(ids), n_query=1)  # (32, R)
    return logprobs.sum(1).view(len(PROMPTS), len(RESPONSES))


def kl_to_optimum(policy, ref_policy, rewards, beta=BETA):
    """KL(pi || pi*) averaged over the prompts, pi* = pi_ref exp(r / beta) / Z,
    both enumerated exactly."""
    log_star = torch.log_softmax(log_pi(ref_policy) + rewards / beta, dim=1)  # (2, 16)
    lp = log_pi(policy)
    return float((lp.exp() * (lp - log_star)).sum(1).mean())


def train_ppo(rewards, iterations, kl_coef=BETA, seed=0, **overrides):
    """The project's PPO (rollout + ppo_update) on the micro-world with a programmatic
    reward r(x, y)."""
    torch.manual_seed(seed)
    ref_policy = GPT(SHAPE).eval().requires_grad_(False)
    policy = copy.deepcopy(ref_policy).requires_grad_(True)
    critic = ScalarGPT(SHAPE)
    settings = dict(max_new_tokens=R, temperature=1.0, batch_size=128, minibatch_size=32,
                    noptepochs=4, lr=3e-3, gamma=1.0, lam=0.95, cliprange=0.2, cliprange_value=0.2,
                    vf_coef=0.5, grad_clip=1.0, weight_decay=0.0)
    cfg = dataclasses.replace(ppo.Config(), **{**settings, **overrides})
    optimizer = ppo.make_optimizer(policy, critic, cfg, torch.device("cpu"))

    def reward_fn(queries, query_mask, responses, response_mask):
        return rewards[queries[:, -1], response_index(responses)]
    # (128, 1): each prompt half the batch
    queries = PROMPTS.repeat(cfg.batch_size // len(PROMPTS), 1)
    for it in range(iterations):
        # annealed to a tenth: the last iterations average out sampling noise
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr * (1 - 0.9 * it / iterations)
        g = torch.Generator().manual_seed(seed * 1000 + it)
        models = ppo_models(policy, ref_policy, critic, reward_fn=reward_fn)
        batch, _ = ppo.rollout(models, queries, torch.ones_like(queries), cfg, kl_coef, generator=g)
        ppo.ppo_update(policy, critic, optimizer, batch, cfg, generator=g)
    return policy, ref_policy


def test_ppo_reaches_the_exact_optimum_of_the_kl_regularised_objective():
    rewards = reward_table()
    policy, ref_policy = train_ppo(rewards, iterations=150)
    start = kl_to_optimum(ref_policy, ref_policy, rewards)
    end = kl_to_optimum(policy, ref_policy, rewards)
    assert start > 0.3, f"the micro-world's optimum should be far from pi_ref (KL {start:.3f})"
    assert end < 0.03, f"KL(pi || pi*) = {end:.4f} after PPO (from {start:.3f})"


def test_the_per_token_kl_summed_over_a_response_is_the_sequence_kl():
    """E_y~pi [sum_t log pi(y_t | x, y_<t) - log pi_ref(y_t | x, y_<t)] = KL(pi(.|x) ||
    pi_ref(.|x)), by enumeration with the per-token logprobs the rollout uses."""
    torch.manual_seed(3)
    policy, ref_policy = GPT(SHAPE), GPT(SHAPE)
    ids = torch.cat([PROMPTS.repeat_interleave(len(RESPONSES), 0),
                     RESPONSES.repeat(len(PROMPTS), 1)], 1)
    mask = torch.ones_like(ids)
    with torch.no_grad():
        per_token = (policy_logprobs(policy, ids, mask, 1)
                     - policy_logprobs(ref_policy, ids, mask, 1))  # (32, R)
        kl_shaped = ppo.compute_rewards(torch.zeros(len(ids)),
                                        policy_logprobs(policy, ids, mask, 1),
                                        policy_logprobs(ref_policy, ids, mask, 1),
                                        mask[:, 1:].bool(), 1.0)[1]
    p = log_pi(policy).exp().view(-1)  # (32,) pi(y|x)
    # (32,) log pi(y|x) - log pi_ref(y|x)
    sequence_kl = (log_pi(policy) - log_pi(ref_policy)).view(-1)
    by_token = (p * per_token.sum(1)).view(2, -1).sum(1)
    by_sequence = (p * sequence_kl).view(2, -1).sum(1)
    torch.testing.assert_close(by_token, by_sequence)
    # the KL the reward uses
    torch.testing.assert_close((p * kl_shaped.sum(1)).view(2, -1).sum(1), by_sequence)
    assert bool((by_sequence > 0).all())
