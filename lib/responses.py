"""
A policy's responses and what is measured on them, written once for every script: sampling them
(the KV-cache `GPT.generate`), cutting them after their first EOS, the policy's log-probabilities of
them, a reward model's score of each, and the KL between two policies on them. ppo.py samples and
scores its rollouts and its evaluations here, label.py the responses labelers rank, evaluate.py and
the lab's evaluation the responses a judge compares, sft.py its greedy samples; reward.py's score is
read here.

A batch of responses (prompts left-padded, so every response starts in the same column P):
    ids             (B, P + R)  prompt, then response; after its first EOS only EOS (padding)
    attention_mask  (B, P + R)  1 on the prompt's real tokens, on the response through its EOS
    responses       (B, R)      ids[:, P:]
    response_mask   (B, R)      1 on the tokens that count: up to and including the first EOS
    has_eos         (B,)        whether the response ended, rather than hitting max_new_tokens
Response token t (column P + t) is predicted by the logits at column P + t - 1.
"""
import torch

from lib.tokens import EOS, decode_response, encode_prompt, encode_response, pad_left, pad_right


def response_mask_from_eos(responses):
    """(B, R) sampled tokens -> (B, R) bool mask: True up to and including the first EOS. EOS and
    padding share id 50256, so the mask comes from the first EOS's position, never from
    token == pad."""
    is_eos = responses == EOS
    eos_before = is_eos.long().cumsum(1) - is_eos.long()  # EOS strictly before t
    return eos_before == 0  # (B, R)


@torch.no_grad()
def sample_responses(policy, queries, query_mask, max_new_tokens, temperature=1.0, generator=None):
    """Sample one response per left-padded prompt (temperature 0: greedy), cut after its first EOS
    -> a batch of responses (the dict described at the top of this file)."""
    policy.eval()
    # (B, P + R); EOS repeats after EOS
    ids = policy.generate(queries, max_new_tokens, temperature=temperature, eos_token_id=EOS,
                          attention_mask=query_mask, generator=generator)
    responses = ids[:, queries.size(1):]  # (B, R)
    response_mask = response_mask_from_eos(responses)  # (B, R)
    attention_mask = torch.cat([query_mask, response_mask.to(query_mask.dtype)], 1)  # (B, P + R)
    return dict(ids=ids, attention_mask=attention_mask, queries=queries, responses=responses,
                response_mask=response_mask, has_eos=(responses == EOS).any(1))


@torch.no_grad()
def sample_and_score(policy, queries, query_mask, max_new_tokens, temperature=1.0, generator=None,
                     reward_model=None, reward_fn=None):
    """sample_responses, then batch["scores"] (B,): the reward model's score of each response or,
    for a programmatic reward, reward_fn(queries, query_mask, responses, response_mask) -> (B,)."""
    batch = sample_responses(policy, queries, query_mask, max_new_tokens, temperature, generator)
    if reward_fn is not None:
        scores = reward_fn(queries, query_mask, batch["responses"], batch["response_mask"])
        scores = scores.float()  # (B,)
    else:
        scores = score_responses(reward_model, batch["ids"], batch["attention_mask"],
                                 batch["has_eos"])  # (B,)
    return {**batch, "scores": scores}


@torch.no_grad()
def sample_and_judge(policy, prompts, judges, max_new_tokens, *, temperature=1.0, seed=0,
                     batch_size=16, ref_policy=None):
    """The policy's responses to `prompts` (token lists), sampled in batches, batch b with seed + b:
    two policies answering the same prompts share their randomness as far as they agree. Each
    response is scored by every judge in `judges`, {name: a reward model, or a function
    (batch, rows) -> scores (B,) of a batch of responses to prompts[rows]}. The one place where
    responses are judged: evaluate.py's win rate and ppo.py's held-out evaluation (its reward model,
    its --judge_ckpt) both call it. Returns {name: scores, "responses": token lists, "lengths",
    "has_eos", "kl"} (one entry per prompt; "kl": the sequence KL to ref_policy, only with one)."""
    device = next(policy.parameters()).device
    out = {name: [] for name in judges} | {"responses": [], "lengths": [], "has_eos": [], "kl": []}
    for b, i in enumerate(range(0, len(prompts), batch_size)):
        queries, query_mask = pad_left(prompts[i:i + batch_size])
        generator = torch.Generator(device=device).manual_seed(seed + b)
        batch = sample_responses(policy, queries.to(device), query_mask.to(device), max_new_tokens,
                                 temperature, generator)
        for name, judge in judges.items():
            if isinstance(judge, torch.nn.Module):
                scores = score_responses(judge, batch["ids"], batch["attention_mask"],
                                         batch["has_eos"])
            else:
                scores = judge(batch, range(i, i + len(queries)))
            out[name] += scores.float().tolist()
        mask = batch["response_mask"]
        out["responses"] += [row[m].tolist() for row, m in zip(batch["responses"], mask)]
        out["lengths"] += mask.sum(1).tolist()
        out["has_eos"] += batch["has_eos"].tolist()
        if ref_policy is not None:
            out["kl"] += sequence_kl(policy, ref_policy, batch, temperature).tolist()
    return out


def decode_responses(enc, batch):
    """The text of each response of a batch, without its EOS."""
    return [decode_response(enc, row) for row in batch["responses"].tolist()]


# ----------------------------------------------------------------------------------------------
# Log-probabilities and KL


def policy_logprobs(policy, ids, attention_mask, n_query, temperature=1.0):
    """log softmax(logits / temperature)[y_t] of the response tokens y = ids[:, n_query:] -> (B, R),
    float32. Token t is scored by the logits at position t - 1, and the lm_head runs on those R
    positions only: no (B, T, V) logits for the prompt. ppo.py's rollout, update and evaluation all
    call it, so the rollout's logprobs are exactly what the first update recomputes (ratio 1). One
    call of the model's forward (the last position predicts nothing and is left out), so a
    DDP-wrapped policy works the same. The (B, R, V) logits are never held whole: the model reduces
    them to the targets' logprobs a chunk of rows at a time (model.chunked_token_logprobs)."""
    return policy(ids[:, :-1], attention_mask[:, :-1], start=n_query - 1, targets=ids[:, n_query:],
                  temperature=temperature)  # (B, R)


@torch.no_grad()
def sequence_kl(policy, ref_policy, batch, temperature=1.0):
    """KL(policy || ref_policy) of each response, estimated on it:
    sum_t log pi(y_t) - log pi_ref(y_t) -> (B,). Responses sampled from `policy` make its mean an
    unbiased estimate of the KL between the two policies."""
    P = batch["queries"].size(1)
    ids, attention_mask = batch["ids"], batch["attention_mask"]
    logprobs = policy_logprobs(policy, ids, attention_mask, P, temperature)  # (B, R)
    ref_logprobs = policy_logprobs(ref_policy, ids, attention_mask, P, temperature)  # (B, R)
    return ((logprobs - ref_logprobs) * batch["response_mask"]).sum(1)  # (B,)


# ----------------------------------------------------------------------------------------------
# Reward-model scores: the scalar head read at the EOS that ends the response (InstructGPT 3.5)


def last_token_index(attention_mask):
    """(B, T) mask, 1 on real tokens -> (B,) index of the last real token (any padding side)."""
    T = attention_mask.size(-1)
    positions = torch.arange(T, device=attention_mask.device)  # (T,)
    return (attention_mask.long() * positions).max(dim=-1).values  # (B,)


def score_sequences(reward_model, ids, attention_mask):
    """Reward of each sequence: the head's output at its last real token, which must be the EOS
    that ends the response (never a padding position, never a mean). ids, attention_mask (B, T)
    -> (B,)."""
    scores = reward_model(ids, attention_mask)  # (B, T)
    last = last_token_index(attention_mask)  # (B,)
    return scores.gather(1, last[:, None]).squeeze(1).float()  # (B,)


def score_responses(reward_model, ids, attention_mask, has_eos):
    """Reward model score at the EOS that ends each sampled response; one is appended where
    sampling hit max_new_tokens (such a row fills every response column, so the new column is right
    after it)."""
    if not bool(has_eos.all()):
        ids = torch.cat([ids, torch.full_like(ids[:, :1], EOS)], 1)  # (B, T + 1)
        appended = (~has_eos).to(attention_mask.dtype)[:, None]  # (B, 1)
        attention_mask = torch.cat([attention_mask, appended], 1)  # (B, T + 1)
    return score_sequences(reward_model, ids, attention_mask)  # (B,)


def rm_tokens(enc, prompt, response, max_prompt_tokens, max_response_tokens):
    """prompt + response + EOS as token ids, what the reward model reads. EOS is appended even after
    a cut response, so the score is always read at an EOS token (tokens.encode_response leaves a cut
    response open, for SFT)."""
    return (encode_prompt(enc, prompt, max_prompt_tokens)
            + encode_response(enc, response, max_response_tokens, eos=False) + [EOS])


@torch.no_grad()
def score_token_lists(reward_model, seqs, batch_size, ctx):
    """Scores (N,) on the CPU of a list of token lists (each ending with EOS), right-padded in
    batches."""
    device = next(reward_model.parameters()).device
    scores = []
    for i in range(0, len(seqs), batch_size):
        ids, attention_mask = pad_right(seqs[i:i + batch_size])
        with ctx:
            batch_scores = score_sequences(reward_model, ids.to(device), attention_mask.to(device))
            scores.append(batch_scores.cpu())
    return torch.cat(scores)


# reward.py's default token budgets: a reward model reads prompt and response cut to these unless
# its checkpoint's config says otherwise (tests/test_reward.py checks that they are reward.Config's)
RM_TOKEN_BUDGETS = {"max_prompt_tokens": 192, "max_response_tokens": 96}


@torch.no_grad()
def score_texts(reward_model, rm_config, enc, prompts, responses, ctx, batch_size=16):
    """Reward-model scores (a list of floats) of prompt + response texts, read as reward.py trained
    the model: prompt + response + EOS within the token budgets of its training config
    `rm_config`."""
    budget = {k: rm_config.get(k, default) for k, default in RM_TOKEN_BUDGETS.items()}
    seqs = [rm_tokens(enc, p, r, budget["max_prompt_tokens"], budget["max_response_tokens"])
            for p, r in zip(prompts, responses)]
    return score_token_lists(reward_model, seqs, batch_size, ctx).tolist()
