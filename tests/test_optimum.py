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
from types import SimpleNamespace

import pytest
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
    settings = dict(max_new_tokens=R, temperature=1.0, batch_size=128, minibatch_size=32,
                    noptepochs=4, lr=3e-3, gamma=1.0, lam=0.95, cliprange=0.2, cliprange_value=0.2,
                    vf_coef=0.5, grad_clip=1.0, weight_decay=0.0, kl_coef=kl_coef)
    cfg = dataclasses.replace(ppo.Config(), **{**settings, **overrides})
    critic = ScalarGPT(SHAPE) if cfg.advantage_estimator == "gae" else None
    optimizer = ppo.make_optimizer(policy, critic, cfg, torch.device("cpu"))

    def reward_fn(queries, query_mask, responses, response_mask):
        return rewards[queries[:, -1], response_index(responses)]
    # (128, 1): each prompt half the batch, in groups of samples_per_prompt
    K = cfg.samples_per_prompt
    queries = PROMPTS.repeat_interleave(K, 0).repeat(cfg.batch_size // (len(PROMPTS) * K), 1)
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


# ----------------------------------------------------------------------------------------------
# Which methods reach pi*? The EXPECTED update of each, computed exactly: a tabular policy (one row
# of logits per state, a state being the prompt and the response so far) can be pi* exactly, and
# averaging the loss over every group of K sampled responses, each weighted by its probability,
# gives the expectation of the update a method makes from a batch (sampling stopped, as in ppo.py:
# old_logprobs = logprobs at the update's first step, ratio 1). The loss is computed by ppo.py's
# own functions: compute_rewards, kl_estimate, group_advantages, aggregate, ppo_policy_loss.
#
# Notation: x_t = log pi(y_t | s_t) - log pi_ref(y_t | s_t) at state s_t, r = r(x, y), beta = BETA.
# The update ascends  E[r] - beta KL  when the method is right. What each placement gives, in
# expectation, with the policy gradient of the score-function estimator (tabular logits theta):
#   KL in the reward, k1: the return R(y) = r - beta sum_t x_t is the sequence objective's sample;
#     E[grad log pi(y) R(y)] = grad (E[r] - beta KL): pi* is the fixed point. At pi*, R(y) = beta
#     log Z is the SAME for every response, so every group's advantages are exactly 0 (rloo,
#     dr_grpo, and grpo too: 0 / (0 + 1e-6)).
#   KL in the loss, sampled tokens, gradient through the current logprobs only:
#     E_{a ~ pi(.|s)}[grad k(x_a)] = sum_a pi(a|s) k'(x_a) grad log pi(a|s), per state s, so
#     k1 (k' = 1):            sum_a grad pi(a|s) = 0: no gradient at all, E[r] alone is maximised;
#     k2 (k' = x):            grad KL(pi(.|s) || pi_ref(.|s)), the reverse KL of each state;
#     k3 (k' = 1 - 1/e^x):    - sum_a pi_ref(a|s) grad log pi(a|s)
#                             = grad KL(pi_ref(.|s) || pi(.|s)), the FORWARD KL of each state.
#     The states are weighted by how often pi visits them, but no token is credited with the KL
#     the tokens after it pay (the loss has no score-function term for the KL), so at state s the
#     fixed point maximises Q_r(s, a) = E[r | s, a] (the score alone) regularised per state:
#       k2: pi(a|s) = pi_ref(a|s) exp(Q_r(s, a) / beta) / Z(s)        (not pi* unless one token)
#       k3: pi(a|s) = beta pi_ref(a|s) / (lambda(s) - Q_r(s, a)), lambda(s) > max_a Q_r(s, a)
#           making it sum to 1 (Lagrange: Q_r(s, a) + beta pi_ref(a|s) / pi(a|s) = lambda(s))
#   KL in the reward, k2 or k3: the update stops where R(y) = r - beta sum_t k(x_t) is equal for
#     every response pi keeps: not pi*. Both k2 and k3 penalise pi(a|s) < pi_ref(a|s) as if it were
#     too likely, so a token of low reward that loses probability pays more KL, which lowers its
#     return further: with k3 such a token is driven to probability 0.

N_STATES = sum(V ** t for t in range(R))  # states per prompt: the empty prefix, then each prefix


def state_index(responses):
    """(B, R) responses -> (B, R) the state each token is sampled in: its prefix numbered in base V
    after the shorter prefixes."""
    index = torch.zeros_like(responses)
    for t in range(1, R):
        prefix = sum(responses[:, s] * V ** (t - 1 - s) for s in range(t))
        index[:, t] = sum(V ** s for s in range(t)) + prefix
    return index


def table_logprobs(theta, prompts, responses):
    """log pi(y_t | s_t) of each token, (B, R), for a table of logits (prompts, N_STATES, V)."""
    logp = torch.log_softmax(theta, -1)[prompts[:, None], state_index(responses)]  # (B, R, V)
    return logp.gather(2, responses[:, :, None]).squeeze(2)


def sequence_logprobs(theta):
    """log pi(y|x) of every response, (prompts, V**R)."""
    prompts = torch.arange(len(PROMPTS)).repeat_interleave(len(RESPONSES))
    lp = table_logprobs(theta, prompts, RESPONSES.repeat(len(PROMPTS), 1))
    return lp.sum(1).view(len(PROMPTS), len(RESPONSES))


def table_of(log_p):
    """The table of logits whose sequence distribution is log_p (prompts, V**R): at each state the
    log of the conditional, pi(a | prefix) = pi(prefix + a) / pi(prefix), by summing suffixes."""
    theta = torch.zeros(len(PROMPTS), N_STATES, V, dtype=log_p.dtype)
    for t in range(R):
        marginal = torch.logsumexp(log_p.view(len(PROMPTS), V ** (t + 1), -1), dim=2)  # prefix+a
        theta[:, sum(V ** s for s in range(t)):sum(V ** s for s in range(t + 1))] = \
            marginal.view(len(PROMPTS), V ** t, V)
    return theta  # logits: log pi(prefix + a), equal to the conditional up to a per-state constant


def method_loss(theta, theta_ref, prompts, responses, scores, kl_penalty="reward",
                kl_estimator="k1", estimator="rloo", K=2, loss_agg="token_mean", beta=BETA,
                weights=None):
    """The loss ppo.py's functions give a batch of responses (B, R) to prompts (B,) with scores
    (B,), each prompt's K responses contiguous, for the table theta; `weights` (B,) weigh the rows
    in the token mean (None: all 1, a sampled batch)."""
    logprobs = table_logprobs(theta, prompts, responses)  # (B, R)
    ref_logprobs = table_logprobs(theta_ref, prompts, responses)
    ones = torch.ones_like(logprobs, dtype=torch.bool)
    beta_reward = beta if kl_penalty == "reward" else 0.0
    token_rewards, _ = ppo.compute_rewards(scores, logprobs.detach(), ref_logprobs, ones,
                                           beta_reward, kl_estimator)
    cfg = SimpleNamespace(advantage_estimator=estimator, samples_per_prompt=K, gamma=1.0, lam=1.0)
    advantages, _ = ppo.compute_advantages(token_rewards, torch.zeros_like(token_rewards), ones,
                                           cfg)
    mask = ones if weights is None else weights[:, None] * ones  # (B, R)
    loss, _, _ = ppo.ppo_policy_loss(logprobs, logprobs.detach(), advantages, mask,
                                     cliprange=0.2, loss_agg=loss_agg)
    if kl_penalty == "loss":
        loss = loss + beta * ppo.aggregate(ppo.kl_estimate(logprobs, ref_logprobs, kl_estimator),
                                           mask, loss_agg)
    return loss


def expected_update(theta, theta_ref, rewards, kl_penalty="reward", kl_estimator="k1",
                    estimator="rloo", K=2, loss_agg="token_mean", beta=BETA):
    """E[gradient of the loss a batch gives], the batch one group of K responses per prompt: every
    group enumerated, its loss weighted by its probability (the weights enter as the mask of the
    token mean: sum_rows w_row sum_t loss / (R sum_rows w_row))."""
    theta = theta.detach().clone().requires_grad_(True)
    groups = torch.tensor(list(itertools.product(range(len(RESPONSES)), repeat=K)))  # (G, K)
    prompts = torch.arange(len(PROMPTS)).repeat_interleave(groups.numel())  # (B,)
    index = groups.view(-1).repeat(len(PROMPTS))  # (B,) a response index per row
    with torch.no_grad():  # the probability of each row's group
        log_seq = sequence_logprobs(theta)[prompts, index].view(-1, K)  # (groups, K)
        weight = log_seq.sum(1).exp().repeat_interleave(K)  # (B,)
    loss = method_loss(theta, theta_ref, prompts, RESPONSES[index], rewards[prompts, index],
                       kl_penalty, kl_estimator, estimator, K, loss_agg, beta, weight)
    return torch.autograd.grad(loss, theta)[0]


def train_table(theta_ref, rewards, iterations=150, groups=32, K=4, lr=0.1, seed=0, **method):
    """A training run of a method on the tabular policy: each iteration samples `groups` groups of
    K responses per prompt from the current policy, one Adam step on method_loss (the learning
    rate annealed to a tenth)."""
    theta = theta_ref.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([theta], lr=lr)
    g = torch.Generator().manual_seed(seed)
    prompts = torch.arange(len(PROMPTS)).repeat_interleave(groups * K)  # (B,)
    for it in range(iterations):
        for group in optimizer.param_groups:
            group["lr"] = lr * (1 - 0.9 * it / iterations)
        with torch.no_grad():
            probs = sequence_logprobs(theta).exp()  # (prompts, 16)
            index = torch.multinomial(probs, groups * K, replacement=True, generator=g).view(-1)
        loss = method_loss(theta, theta_ref, prompts, RESPONSES[index], rewards[prompts, index],
                           K=K, **method)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return theta.detach()


def world(seed=0):
    """The micro-world in float64 (so 0 is 0): pi_ref's table, the rewards, pi*'s table."""
    theta_ref = torch.randn(len(PROMPTS), N_STATES, V, dtype=torch.float64,
                            generator=torch.Generator().manual_seed(seed + 1))
    rewards = reward_table(seed).double()
    theta_star = table_of(torch.log_softmax(sequence_logprobs(theta_ref) + rewards / BETA, 1))
    return theta_ref, rewards, theta_star


def per_state_optimum(theta_ref, rewards, kl_estimator):
    """The fixed point of the KL in the loss, derived above: solved backwards from the last token,
    each state's pi(.|s) from Q_r(s, a), the expected score after a (no KL credit)."""
    theta = torch.zeros_like(theta_ref)
    ref = torch.softmax(theta_ref, -1)  # (prompts, N_STATES, V)
    q = rewards.view(len(PROMPTS), -1, V)  # Q_r at the last token: the score
    for t in reversed(range(R)):
        first = sum(V ** s for s in range(t))
        states = slice(first, first + V ** t)
        p_ref = ref[:, states]  # (prompts, V**t, V)
        if kl_estimator == "k2":
            pi = p_ref * torch.exp(q / BETA)
            pi = pi / pi.sum(-1, keepdim=True)
        else:  # k3: bisect lambda in (max Q, max Q + beta]: sum_a pi(a) falls from +inf to <= 1
            lo, hi = q.max(-1, keepdim=True).values, q.max(-1, keepdim=True).values + BETA
            for _ in range(200):
                mid = (lo + hi) / 2
                too_big = (BETA * p_ref / (mid - q)).sum(-1, keepdim=True) > 1
                lo, hi = torch.where(too_big, mid, lo), torch.where(too_big, hi, mid)
            pi = BETA * p_ref / (hi - q)
            pi = pi / pi.sum(-1, keepdim=True)  # (the bisection leaves 1e-16)
        theta[:, states] = pi.log()
        if t > 0:  # Q_r one token earlier
            q = (pi * q).sum(-1).view(len(PROMPTS), -1, V)
    return theta


def kl_between(theta_p, theta_q):
    """KL(p || q) of two tables' response distributions, averaged over the prompts."""
    lp, lq = sequence_logprobs(theta_p), sequence_logprobs(theta_q)
    return float((lp.exp() * (lp - lq)).sum(1).mean())


def last_token_part(grad):
    return grad[:, sum(V ** s for s in range(R - 1)):]


def test_with_the_kl_in_the_reward_as_k1_pi_star_is_the_fixed_point_of_rloo_dr_grpo_and_grpo():
    """At pi* every response's return is beta log Z(x): each group's advantages are 0, whatever the
    estimator, for K = 2 and 3 (grpo included: its std is 0 too, and 0 / (0 + 1e-6) = 0). Away
    from pi* the expected update is not 0 (the test can fail)."""
    theta_ref, rewards, theta_star = world()
    for estimator in ("rloo", "dr_grpo", "grpo"):
        for K in (2, 3):
            at_star = expected_update(theta_star, theta_ref, rewards, estimator=estimator, K=K)
            assert at_star.abs().max() < 1e-8, (estimator, K, at_star.abs().max())
        at_ref = expected_update(theta_ref, theta_ref, rewards, estimator=estimator)
        assert at_ref.abs().max() > 1e-3, estimator


def test_rloo_expected_update_is_the_gradient_of_the_kl_regularised_objective():
    """rloo with the KL (k1) in the reward: its expected update at ANY policy is -1/R times the
    gradient of E[r] - beta KL(pi || pi_ref), computed by autograd on the enumerated objective: the
    estimator is unbiased (its baseline leaves the sample out). dr_grpo's is (K-1)/K of it."""
    theta_ref, rewards, _ = world()
    theta = theta_ref + torch.randn(theta_ref.shape, dtype=torch.float64,
                                    generator=torch.Generator().manual_seed(5))
    exact = theta.clone().requires_grad_(True)
    lp, lp_ref = sequence_logprobs(exact), sequence_logprobs(theta_ref)
    objective = (lp.exp() * (rewards - BETA * (lp - lp_ref))).sum(1).mean()
    gradient = torch.autograd.grad(objective, exact)[0]
    for estimator, scale in (("rloo", 1.0), ("dr_grpo", 0.5)):
        update = expected_update(theta, theta_ref, rewards, estimator=estimator, K=2)
        torch.testing.assert_close(update, -scale * gradient / R)


@pytest.mark.parametrize("kl_estimator", ["k1", "k2", "k3"])
def test_with_the_kl_in_the_loss_pi_star_is_not_a_fixed_point_and_the_derived_one_is(
        kl_estimator):
    """KL in the loss (rloo advantages of the score alone): at pi* the expected update is not 0 for
    any estimator (so none of them solves eq. 2); with k1 it is exactly the update without any KL
    (k1's expected gradient is 0); with k2 and k3 it vanishes at the per-state fixed point derived
    above, which is not pi*. At pi* the last token's part of the k2 update is 0 (the last token has
    no tokens after it to be credited with), the first token's is not."""
    theta_ref, rewards, theta_star = world()
    at_star = expected_update(theta_star, theta_ref, rewards, "loss", kl_estimator)
    assert at_star.abs().max() > 1e-3
    if kl_estimator == "k1":
        no_kl = expected_update(theta_star, theta_ref, rewards, "reward", beta=0.0)
        torch.testing.assert_close(at_star, no_kl)
        return
    theta_fixed = per_state_optimum(theta_ref, rewards, kl_estimator)
    at_fixed = expected_update(theta_fixed, theta_ref, rewards, "loss", kl_estimator)
    assert at_fixed.abs().max() < 1e-9, at_fixed.abs().max()
    assert kl_between(theta_fixed, theta_star) > 1e-3
    if kl_estimator == "k2":
        assert last_token_part(at_star).abs().max() < 1e-9
        assert at_star.abs().max() > 1e-3


def test_with_the_kl_in_the_reward_as_k2_or_k3_pi_star_is_not_a_fixed_point():
    """k2 and k3 in the reward: the update at pi* is not 0 (R(y) is no longer the same for every
    response); it stops only where r - beta sum_t k(x_t) is equal for every response kept. k3 never
    stops on a token of low reward: as its probability falls, pi(a) k3(a) tends to pi_ref(a), not
    to 0, so the push on its logit does not vanish and the token is driven to probability 0 (pi*
    keeps every token)."""
    theta_ref, rewards, theta_star = world()
    for kl_estimator in ("k2", "k3"):
        at_star = expected_update(theta_star, theta_ref, rewards, "reward", kl_estimator)
        assert at_star.abs().max() > 1e-3, kl_estimator
    assert float(torch.softmax(theta_star, -1).min()) > 1e-3, "pi* keeps every token"
    # k3: lower the worst token of one last-token state towards 0: the update on its logit stays
    state, worst = N_STATES - 1, int(rewards[0, -V:].argmin())
    pushes = []
    for p in (1e-3, 1e-6, 1e-9):
        theta = theta_ref.clone()
        probs = torch.softmax(theta_ref[0, state], -1)
        probs = probs * (1 - p) / (1 - probs[worst])
        probs[worst] = p
        theta[0, state] = probs.log()
        pushes.append(float(expected_update(theta, theta_ref, rewards, "reward", "k3")[0, state,
                                                                                        worst]))
    assert all(push > 1e-4 for push in pushes), pushes  # the loss rises with it: pushed down
    assert pushes[-1] > 0.5 * pushes[0], pushes


# Dr. GRPO's claim in miniature (Liu et al. 2025, section 3.1): one prompt, three responses chosen
# by the first token, the rest of each response fixed: a short wrong answer (2 tokens), a long
# wrong answer (4 tokens) and a right one (2 tokens); reward 1 if right. The expected update of the
# first token's logits from a group of K responses with grpo's advantages, every group enumerated.
LENGTHS, CORRECT = torch.tensor([2, 4, 2]), torch.tensor([0.0, 0.0, 1.0])


def length_update(loss_agg, K, estimator="grpo"):
    """E[gradient] on the 3 first-token logits (uniform policy), a batch being one group of K."""
    theta = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    total = torch.zeros(3, dtype=torch.float64)
    for group in itertools.product(range(3), repeat=K):
        group = torch.tensor(group)
        first = torch.log_softmax(theta, 0)[group]  # (K,)
        logprobs = torch.zeros(K, int(LENGTHS.max()), dtype=torch.float64)  # later tokens: p = 1
        logprobs = torch.cat([first[:, None], logprobs[:, 1:]], 1)  # (K, T)
        mask = torch.arange(logprobs.size(1))[None] < LENGTHS[group][:, None]  # (K, T)
        advantages = ppo.group_advantages(CORRECT[group].double(), K, estimator)[:, None] * mask
        loss, _, _ = ppo.ppo_policy_loss(logprobs, logprobs.detach(), advantages, mask, 0.2,
                                         loss_agg)
        weight = float(torch.softmax(theta.detach(), 0)[group].prod())
        total += weight * torch.autograd.grad(loss, theta)[0]
    return total


@pytest.mark.parametrize("K", [2, 4])
def test_dr_grpo_per_response_token_mean_prefers_the_long_wrong_answer(K):
    """The two wrong answers are equally likely and equally wrong, so an unbiased update moves them
    alike. Gradient descent changes log pi(long wrong) - log pi(short wrong) by -(g_long - g_short)
    per unit step: with seq_mean_token_mean (GRPO as published) it rises, because each response's
    loss is divided by its length, so the long wrong answer's negative advantage is spread thin;
    with seq_mean_token_sum (Dr. GRPO) it does not move. token_mean over a batch of one group sits
    between: its divisor is the group's token count, larger when the long answer is in the group
    (over a batch of many groups that divisor, and the bias, fade)."""
    preference = {agg: float(-(g[1] - g[0])) for agg in
                  ("seq_mean_token_mean", "seq_mean_token_sum", "token_mean")
                  for g in [length_update(agg, K)]}
    assert preference["seq_mean_token_mean"] > 1e-3, preference
    assert abs(preference["seq_mean_token_sum"]) < 1e-12, preference
    assert 0 < preference["token_mean"] < preference["seq_mean_token_mean"], preference
    # and the right answer gains under every aggregation
    for agg in preference:
        g = length_update(agg, K)
        assert float(g[2]) < 0, (agg, g)


def method_optimum(theta_ref, rewards, kl_penalty, kl_estimator):
    """log pi(y|x) (prompts, 16) where a method's expected update vanishes, derived above: pi* (KL
    in the reward, k1), the per-state fixed points (KL in the loss, k2 or k3), or None (KL in the
    loss, k1: no regularisation, the update runs towards argmax r)."""
    if kl_penalty == "reward":
        return torch.log_softmax(sequence_logprobs(theta_ref) + rewards / BETA, 1)
    if kl_estimator == "k1":
        return None
    return sequence_logprobs(per_state_optimum(theta_ref, rewards, kl_estimator))


def kl_of(log_p, log_q):
    return float((log_p.exp() * (log_p - log_q)).sum(1).mean())


METHODS = {"rloo": dict(estimator="rloo"), "grpo": dict(estimator="grpo"),
           "dr_grpo": dict(estimator="dr_grpo"), "reinforce_pp": dict(estimator="reinforce_pp"),
           "loss_k1": dict(kl_penalty="loss", kl_estimator="k1"),
           "loss_k2": dict(kl_penalty="loss", kl_estimator="k2"),
           "loss_k3": dict(kl_penalty="loss", kl_estimator="k3")}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_a_short_training_run_of_each_method_ends_where_the_derivation_says(name):
    """Sampled batches, ppo.py's losses, Adam, on the tabular policy: each method ends near the
    fixed point derived above (KL to it < 0.01, from > 0.3 at pi_ref), and a method whose fixed
    point is not pi* ends measurably away from pi*; KL in the loss as k1 ends past pi*'s score (it
    optimises E[r] alone). rloo, grpo, dr_grpo and reinforce_pp have the KL (k1) in the reward."""
    theta_ref, rewards, theta_star = world()
    method = dict(METHODS[name])
    theta = train_table(theta_ref, rewards, **method)
    lp, log_star = sequence_logprobs(theta), sequence_logprobs(theta_star)
    target = method_optimum(theta_ref, rewards, method.get("kl_penalty", "reward"),
                            method.get("kl_estimator", "k1"))
    if target is None:
        score = float((lp.exp() * rewards).sum(1).mean())
        star_score = float((log_star.exp() * rewards).sum(1).mean())
        assert score > star_score + 0.05, (score, star_score)
        return
    start = kl_of(sequence_logprobs(theta_ref), target)
    assert start > 0.3, start
    assert kl_of(lp, target) < 0.01, (kl_of(lp, target), start)
    if method.get("kl_penalty") == "loss":
        assert kl_of(lp, log_star) > 3 * kl_of(lp, target), (kl_of(lp, log_star), name)


@pytest.mark.parametrize("method", [dict(advantage_estimator="rloo"),
                                    dict(advantage_estimator="rloo", kl_penalty="loss",
                                         kl_estimator="k2")], ids=["rloo", "loss_k2"])
def test_ppo_py_critic_free_end_to_end_ends_at_the_derived_fixed_point(method):
    """The same through ppo.py's rollout and ppo_update on the GPT micro-world (no critic): rloo
    with the KL in the reward ends at pi*; k2 in the loss at its per-state fixed point."""
    rewards = reward_table()
    policy, ref_policy = train_ppo(rewards, iterations=100, samples_per_prompt=4, **method)
    log_ref = log_pi(ref_policy).double()
    target = method_optimum(table_of(log_ref), rewards.double(), method.get("kl_penalty",
                                                                              "reward"), "k2")
    lp = log_pi(policy).double()
    assert kl_of(log_ref, target) > 0.3
    assert kl_of(lp, target) < 0.03, kl_of(lp, target)
