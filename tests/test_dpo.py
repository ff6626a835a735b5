"""dpo.py: eq. (7) against a hand computation, sequence log-probabilities against a token-by-token
loop, the exact optimum of the micro-world (the same pi* = pi_ref exp(r / beta) / Z that PPO
reaches), train() learning a synthetic preference, and the memory knobs: LoRA trains the adapters
only with the reference left as the SFT model, and activation checkpointing and gradient
accumulation give the same update. Two processes under torchrun: tests/test_distributed.py."""
import contextlib
import copy
import itertools
import math

import pytest
import torch

import dpo
from conftest import synthetic_preferences, write_jsonl
from lib.checkpoints import load_checkpoint, load_model, save_checkpoint
from lib.tokens import EOS
from lib.tracking import read_metrics
from model import GPT, GPTConfig, lora_disabled


def test_dpo_loss_against_a_hand_computation():
    beta = 0.5
    logps = dict(chosen=torch.tensor([-3.0, -1.0]), rejected=torch.tensor([-2.0, -4.0]),
                 ref_chosen=torch.tensor([-2.5, -2.0]), ref_rejected=torch.tensor([-2.0, -3.0]))
    sides = [logps[k] for k in ("chosen", "rejected", "ref_chosen", "ref_rejected")]
    loss, r_w, r_l = dpo.dpo_loss(*sides, beta)
    # pair 1: beta (-3 + 2.5) - beta (-2 + 2) = -0.25; pair 2: beta (-1 + 2) - beta (-4 + 3) = 1.0;
    # -log sigmoid(z) = log(1 + e^-z)
    pair_losses = (math.log(1 + math.exp(0.25)), math.log(1 + math.exp(-1.0)))
    assert loss.item() == pytest.approx(sum(pair_losses) / 2, rel=1e-6)
    assert r_w.tolist() == [-0.25, 0.5] and r_l.tolist() == [0.0, -0.5]
    weighted, _, _ = dpo.dpo_loss(*sides, beta, weights=torch.tensor([3.0, 1.0]))
    assert abs(weighted.item() - (3 * pair_losses[0] + pair_losses[1]) / 4) < 1e-6


def test_sequence_logprobs_sum_the_response_tokens_only():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=32, vocab_size=EOS + 1))
    model.eval()
    pairs = [([5, 6, 7], [8, 9, EOS], [10, EOS]), ([11], [12, 13, 14, 15], [16])]
    ids, attention_mask, response_mask = dpo.collate(pairs)
    got = dpo.sequence_logprobs(model, ids, attention_mask, response_mask)
    seqs = [(p, c) for p, c, _ in pairs] + [(p, r) for p, _, r in pairs]
    for b, (prompt, response) in enumerate(seqs):
        tokens, expected = prompt + response, 0.0
        for t in range(len(prompt), len(tokens)):  # token t given tokens < t, a forward each
            logits = model(torch.tensor([tokens[:t]]))[0, -1]
            expected += torch.log_softmax(logits, -1)[tokens[t]].item()
        assert abs(got[b].item() - expected) < 1e-4, (b, got[b].item(), expected)


def test_pair_logprobs_score_each_distinct_sequence_once_and_give_every_pairs_own():
    # every pair of a 4-way ranking and of another prompt's 3-way one: 9 pairs, 7 distinct
    # sequences. Scored in batches of 3 sequences, each side must equal its own pair scored alone.
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=32, vocab_size=EOS + 1))
    model.eval()
    rankings = [([5, 6], [[8, EOS], [9, 9, EOS], [10, EOS], [11, 12, 13]]),
                ([7], [[8, EOS], [14, EOS], [15]])]
    pairs = [(p, ys[w], ys[l]) for p, ys in rankings
             for w, l in itertools.combinations(range(len(ys)), 2)]
    calls = []
    counting = lambda module, args: calls.append(args[0].shape[0])
    handle = model.register_forward_pre_hook(counting)
    chosen, rejected = dpo.pair_logprobs(model, pairs, device="cpu", ctx=contextlib.nullcontext(),
                                         batch_size=3)
    handle.remove()
    assert sum(calls) == 7 and max(calls) <= 3
    for i, pair in enumerate(pairs):
        alone = dpo.sequence_logprobs(model, *dpo.collate([pair]))  # (2,): chosen, rejected
        torch.testing.assert_close(torch.stack([chosen[i], rejected[i]]), alone, atol=1e-5,
                                   rtol=1e-5)


# The micro-world of tests/test_optimum.py: 2 one-token prompts, every response of 2 tokens over 4
# tokens.
V, R, BETA = 4, 2, 0.5
PROMPTS = torch.tensor([[0], [1]])
RESPONSES = torch.tensor(list(itertools.product(range(V), repeat=R)))  # (16, R)


def all_logps(policy):
    """log pi(y|x) (2, 16) of every response, by dpo.sequence_logprobs."""
    ids = torch.cat([PROMPTS.repeat_interleave(len(RESPONSES), 0),
                     RESPONSES.repeat(len(PROMPTS), 1)], 1)  # (32, 3)
    logps = dpo.sequence_logprobs(policy, ids, torch.ones_like(ids), torch.ones(len(ids), R))
    return logps.view(len(PROMPTS), -1)


def train_dpo_on_all_pairs(rewards, beta, steps=300, loss_beta=None):
    """Full-batch DPO on every pair (i, j) of every prompt, each order weighted by the Bradley-Terry
    probability sigmoid(r_i - r_j) that a labeler prefers it: the expected loss under preferences
    drawn from r."""
    torch.manual_seed(0)
    ref = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=8, vocab_size=V))
    ref.eval().requires_grad_(False)
    policy = copy.deepcopy(ref).requires_grad_(True)
    i, j = torch.triu_indices(len(RESPONSES), len(RESPONSES), 1)
    with torch.no_grad():
        ref_logps = all_logps(ref)
    optimizer = torch.optim.Adam(policy.parameters(), lr=1e-2)
    for _ in range(steps):
        logps = all_logps(policy)
        loss = 0.0
        for x in range(len(PROMPTS)):
            p = torch.sigmoid(rewards[x, i] - rewards[x, j])  # P(i preferred to j)
            a, b, ra, rb = logps[x, i], logps[x, j], ref_logps[x, i], ref_logps[x, j]
            both_orders = (torch.cat([a, b]), torch.cat([b, a]), torch.cat([ra, rb]),
                           torch.cat([rb, ra]))
            loss = loss + dpo.dpo_loss(*both_orders, loss_beta or beta,
                                       weights=torch.cat([p, 1 - p]))[0]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        log_star = torch.log_softmax(ref_logps + rewards / beta, dim=1)
        lp = all_logps(policy)
        start = float((ref_logps.exp() * (ref_logps - log_star)).sum(1).mean())
        return start, float((lp.exp() * (lp - log_star)).sum(1).mean())


def test_dpo_reaches_the_exact_optimum_of_the_kl_regularised_objective():
    rewards = torch.rand(2, len(RESPONSES), generator=torch.Generator().manual_seed(0)) * 2 - 1
    start, end = train_dpo_on_all_pairs(rewards, BETA)
    assert start > 0.3 and end < 0.01, (start, end)
    # beta applied twice: another optimum
    _, wrong = train_dpo_on_all_pairs(rewards, BETA, loss_beta=BETA * BETA)
    assert wrong > 10 * end, (end, wrong)


def test_train_learns_a_synthetic_preference(tmp_path):
    """Chosen responses contain "banana": DPO's implicit reward learns to rank the validation
    pairs."""
    write_jsonl(tmp_path / "comparisons_train.jsonl", synthetic_preferences(96, seed=0))
    write_jsonl(tmp_path / "comparisons_val.jsonl", synthetic_preferences(24, seed=1))
    torch.manual_seed(0)
    sft_model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=64))
    base = save_checkpoint(str(tmp_path / "sft.pt"), sft_model, dpo.Config())
    cfg = dpo.Config(out_dir=str(tmp_path / "out"), data_dir=str(tmp_path), init_from=base,
                     beta=0.1, device="cpu", max_prompt_tokens=16, max_response_tokens=24,
                     batch_size=16, max_steps=60, lr=1e-3, warmup_steps=5, eval_interval=20)
    result = dpo.train(cfg)
    rows = [r for r in read_metrics(result["metrics_path"]) if "val/acc" in r]
    assert abs(rows[0]["val/loss"] - math.log(2)) < 1e-6  # at the start pi = pi_ref: margins 0
    assert result["val/acc"] >= 0.9 and result["val/loss"] < 0.5, result


# ----------------------------------------------------------------------------------------------
# The memory knobs: LoRA, activation checkpointing, gradient accumulation

BUILD_POLICY = dpo.build_policy  # run_dpo wraps it; a second run must not wrap the wrapper


def preference_data(tmp_path):
    """Synthetic comparisons and a small SFT checkpoint to start from: (data_dir, its path)."""
    write_jsonl(tmp_path / "comparisons_train.jsonl", synthetic_preferences(48, seed=0))
    write_jsonl(tmp_path / "comparisons_val.jsonl", synthetic_preferences(12, seed=1))
    torch.manual_seed(0)
    sft_model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=64))
    return str(tmp_path), save_checkpoint(str(tmp_path / "sft.pt"), sft_model, dpo.Config())


def run_dpo(monkeypatch, data_dir, init_from, out_dir, sgd=False, **flags):
    """dpo.train on the synthetic comparisons; returns (its result, the policy and reference it
    built, and how often the policy's first block ran for training, gradients on). sgd: plain SGD
    instead of AdamW, whose step is proportional to the gradient (Adam's first step is nearly
    invariant to the gradient's scale)."""
    built = {"train_calls": 0}

    def count(block, _):
        if block.training and torch.is_grad_enabled():
            built["train_calls"] += 1

    def build_and_keep(cfg, device):
        policy, ref_policy = BUILD_POLICY(cfg, device)
        built.update(policy=policy, ref_policy=ref_policy)
        policy.transformer.h[0].register_forward_pre_hook(count)
        return policy, ref_policy

    monkeypatch.setattr(dpo, "build_policy", build_and_keep)
    if sgd:
        sgd_step = lambda params, lr, *_, **__: torch.optim.SGD(params, lr)
        monkeypatch.setattr(dpo, "make_adamw", sgd_step)
    cfg = dpo.Config(**{**dict(out_dir=str(out_dir), data_dir=data_dir, init_from=init_from,
                               device="cpu", beta=0.1, max_prompt_tokens=16, max_response_tokens=24,
                               batch_size=8, lr=1e-3, warmup_steps=0, eval_interval=5), **flags})
    return dpo.train(cfg), built


def test_lora_trains_only_the_adapters_and_the_reference_stays_the_sft_model(tmp_path,
                                                                             monkeypatch):
    data_dir, sft_path = preference_data(tmp_path)
    result, built = run_dpo(monkeypatch, data_dir, sft_path, tmp_path / "out", lora_rank=4,
                            lr=1e-2, max_steps=10)
    policy, ref_policy = built["policy"], built["ref_policy"]
    assert {n for n, p in policy.named_parameters() if p.requires_grad} == \
        {n for n in policy.state_dict() if "lora_" in n}
    sft_model = load_model(sft_path, "gpt")[0].eval()
    for name, weight in sft_model.state_dict().items():  # the frozen network: the SFT model's
        assert torch.equal(ref_policy.state_dict()[name], weight), name
    ids = torch.randint(0, 1000, (3, 12), generator=torch.Generator().manual_seed(0))
    policy.eval()
    with torch.no_grad(), lora_disabled(policy):  # pi_ref: the policy with its adapters off
        torch.testing.assert_close(policy(ids), sft_model(ids), atol=0, rtol=0)
        torch.testing.assert_close(ref_policy(ids), sft_model(ids), atol=0, rtol=0)
    with torch.no_grad():
        trained = policy(ids)
    assert (trained - sft_model(ids)).abs().max() > 1e-3  # the adapters learned something
    rows = [r for r in read_metrics(result["metrics_path"]) if "val/loss" in r]
    assert abs(rows[0]["val/loss"] - math.log(2)) < 1e-6  # B = 0: the policy starts as pi_ref
    assert rows[-1]["val/loss"] < rows[0]["val/loss"]
    # the checkpoint holds the adapters on their base; every other script loads it merged
    ckpt = load_checkpoint(result["ckpt_path"])
    assert ckpt["step"] == 10 and ckpt["lora"]["base"] == sft_path
    assert all("lora_" in name for name in ckpt["model"])
    merged, _ = load_model(result["ckpt_path"], "gpt")
    assert not any("lora_" in name for name in merged.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(merged.eval()(ids), trained, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("knob", [dict(grad_accum=4), dict(grad_checkpoint=True),
                                  dict(grad_accum=2, grad_checkpoint=True)])
def test_grad_checkpoint_and_grad_accum_give_the_same_update(tmp_path, monkeypatch, knob):
    """One step of plain SGD on 8 pairs, the memory knob on and off: the same weights after it (so
    the same gradient), and the knob really ran (more micro-batches, or each block run again in
    backward)."""
    data_dir, sft_path = preference_data(tmp_path)
    one_step = dict(sgd=True, lr=0.5, grad_clip=0.0, max_steps=1, eval_interval=1)
    plain, before = run_dpo(monkeypatch, data_dir, sft_path, tmp_path / "plain", **one_step)
    knobbed, after = run_dpo(monkeypatch, data_dir, sft_path, tmp_path / "knob", **one_step,
                             **knob)
    start = load_model(sft_path, "gpt")[0].state_dict()
    step_sq, error_sq = 0.0, 0.0
    for name, weight in before["policy"].state_dict().items():
        step_sq += ((weight - start[name]) ** 2).sum().item()
        error_sq += ((after["policy"].state_dict()[name] - weight) ** 2).sum().item()
    relative = (error_sq / step_sq) ** 0.5  # |step with the knob - step without| / |step without|
    print(f"{knob}: relative difference of the step {relative:.1e}, its norm {step_sq ** 0.5:.2e}")
    assert step_sq > 1e-4 and relative < 1e-5
    rows = [[r for r in read_metrics(x["metrics_path"]) if r["step"] == 1][0]
            for x in (plain, knobbed)]
    for key in ("loss", "acc", "margin", "val/loss"):  # the step's statistics, over all its pairs
        assert rows[1][key] == pytest.approx(rows[0][key], rel=1e-5, abs=1e-6), key
    # the first block's training passes: one per micro-batch, and with checkpointing once more in
    # backward
    assert before["train_calls"] == 1
    passes = 2 if knob.get("grad_checkpoint") else 1
    assert after["train_calls"] == knob.get("grad_accum", 1) * passes


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_dpo_trains_in_bf16_on_the_cpu(tmp_path, monkeypatch, lora_rank):
    """--dtype bfloat16 (the GPU path, here CPU autocast; with LoRA the frozen network is stored in
    bf16): finite losses that differ from float32's by bf16 rounding only."""
    data_dir, sft_path = preference_data(tmp_path)
    runs = {dtype: run_dpo(monkeypatch, data_dir, sft_path, tmp_path / dtype, dtype=dtype,
                           lora_rank=lora_rank, lr=1e-2, max_steps=4, eval_interval=4)
            for dtype in ("bfloat16", "float32")}
    bf16, fp32 = runs["bfloat16"][0], runs["float32"][0]
    frozen = {p.dtype for p in runs["bfloat16"][1]["policy"].parameters() if not p.requires_grad}
    assert frozen == ({torch.bfloat16} if lora_rank else set())
    assert math.isfinite(bf16["val/loss"]) and bf16["val/loss"] != fp32["val/loss"]
    assert bf16["val/loss"] == pytest.approx(fp32["val/loss"], rel=0.1, abs=0.05)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # inductor's own use of torch.jit
def test_compile_on_the_cpu_gives_eager_losses(tmp_path, monkeypatch):
    """torch.compile (inductor, C++ on the CPU) of the policy's training passes: the same losses as
    eager, to float rounding."""
    data_dir, sft_path = preference_data(tmp_path)
    results = [run_dpo(monkeypatch, data_dir, sft_path, tmp_path / str(c), compile=c, max_steps=3,
                       eval_interval=3)[0] for c in (True, False)]
    rows = [[r for r in read_metrics(x["metrics_path"]) if r["step"] == 3][0] for x in results]
    for key in ("loss", "val/loss"):
        assert rows[0][key] == pytest.approx(rows[1][key], rel=1e-4), key
