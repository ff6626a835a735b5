"""Tests for sft.py: the response-only loss, the demonstration encoding and mask, and train()
end to end."""
import contextlib
import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import lib.ddp
import sft
from conftest import (
    DEMOS,
    REPO,
    A,
    H,
    NoSyncRecorder,
    assert_close_grads,
    gradients,
    sft_tiny_config,
    write_data,
)
from lib.checkpoints import load_model, save_checkpoint
from lib.config import UsageError
from lib.tokens import EOS, get_tokenizer
from lib.training import lr_at
from model import GPT, GPTConfig, token_logprobs


def test_sft_loss_matches_hand_computation():
    torch.manual_seed(0)
    B, T, V = 3, 5, 11
    logits, targets = torch.randn(B, T, V), torch.randint(0, V, (B, T))
    mask = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 0, 0], [0, 0, 0, 0, 1]])
    total, count = 0.0, 0
    for b in range(B):
        for t in range(T):
            if mask[b, t]:
                total -= F.log_softmax(logits[b, t].double(), dim=-1)[targets[b, t]].item()
                count += 1
    expected = total / count  # mean over all response tokens of the batch, not a mean of row means
    got = sft.sft_loss(token_logprobs(logits, targets), mask).item()
    print(f"sft_loss {got:.6f} vs hand {expected:.6f}, diff {abs(got - expected):.2e}")
    assert got == pytest.approx(expected, abs=1e-5)


def test_sft_loss_of_a_single_response_token_is_its_nll():
    torch.manual_seed(0)
    logits, targets = torch.randn(2, 3, 7), torch.tensor([[1, 2, 3], [4, 5, 6]])
    mask = torch.tensor([[0, 0, 0], [0, 1, 0]])
    expected = -torch.log_softmax(logits[1, 1].double(), -1)[5].item()
    got = sft.sft_loss(token_logprobs(logits, targets), mask).item()
    assert got == pytest.approx(expected, abs=1e-6)


def test_prompt_targets_and_padding_never_change_the_loss():
    torch.manual_seed(1)
    B, T, V = 2, 6, 13
    logits, targets = torch.randn(B, T, V), torch.randint(0, V, (B, T))
    # row 0: prompt, response, padding
    mask = torch.tensor([[0, 0, 1, 1, 0, 0], [0, 1, 1, 1, 1, 1]])
    base = sft.sft_loss(token_logprobs(logits, targets), mask)
    # every masked-out target changed
    other_targets = torch.where(mask.bool(), targets, (targets + 5) % V)
    other_logits = torch.where(mask.bool()[..., None], logits, 100 * torch.randn(B, T, V))
    assert sft.sft_loss(token_logprobs(logits, other_targets), mask) == base
    assert sft.sft_loss(token_logprobs(other_logits, targets), mask) == base


def test_encoded_mask_covers_exactly_response_and_eos():
    enc = get_tokenizer()
    examples = []
    for d in DEMOS[:3]:
        tokens, n_prompt, prompt_cut, response_cut = sft.encode_demo(enc, d["prompt"],
                                                                     d["response"], 64, 32)
        assert not prompt_cut and not response_cut
        expected = enc.encode_ordinary(d["prompt"]) + enc.encode_ordinary(d["response"]) + [EOS]
        assert tokens == expected
        examples.append((tokens, n_prompt))
    x, y, loss_mask = sft.collate(examples)  # rows of different lengths: padding on the right
    assert x.shape == y.shape == loss_mask.shape == (3, max(len(t) for t, _ in examples) - 1)
    for i, (d, (tokens, n_prompt)) in enumerate(zip(DEMOS, examples)):
        n = len(tokens) - 1
        assert x[i, :n].tolist() == tokens[:-1] and y[i, :n].tolist() == tokens[1:]
        assert y[i][loss_mask[i].bool()].tolist() == enc.encode_ordinary(d["response"]) + [EOS]
        # the first counted position is the last prompt token, which predicts the
        # first response token
        assert loss_mask[i].nonzero()[0].item() == n_prompt - 1
        assert loss_mask[i, len(tokens) - 1:].sum() == 0  # padding


def test_encode_demo_keeps_prompt_end_and_cuts_long_response_without_eos():
    enc = get_tokenizer()
    prompt = H + "one two three four five six seven eight nine ten" + A
    response = " alpha beta gamma delta epsilon zeta eta theta"
    tokens, n_prompt, prompt_cut, response_cut = sft.encode_demo(enc, prompt, response, 5, 4)
    assert prompt_cut and response_cut and n_prompt == 5 and len(tokens) == 9
    assert tokens[:5] == enc.encode_ordinary(prompt)[-5:]  # the end of the prompt, "...Assistant:"
    assert tokens[5:] == enc.encode_ordinary(response)[:4] and EOS not in tokens


def test_batch_loss_equals_loss_on_full_logits():
    torch.manual_seed(2)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=EOS + 1)).eval()
    examples = [(torch.randint(0, EOS, (n,)).tolist() + [EOS], p)
                for n, p in ((12, 5), (7, 3), (20, 11))]
    x, y, loss_mask = sft.collate(examples)
    lengths = torch.tensor([len(t) - 1 for t, _ in examples])
    attention_mask = (torch.arange(x.size(1))[None] < lengths[:, None])
    # explicit padding mask
    full = sft.sft_loss(token_logprobs(model(x, attention_mask.long()), y), loss_mask)
    fast = sft.batch_loss(model.transformer, model, x, y, loss_mask)  # selected logits, no mask
    print(f"batch_loss {fast.item():.6f} vs full logits {full.item():.6f}")
    assert fast.item() == pytest.approx(full.item(), abs=1e-5)


def test_lr_warms_up_then_decays_to_min_lr():
    lrs = [lr_at(s, 1e-3, 1e-4, 10, 100) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert lr_at(100, 1e-3, 1e-4, 10, 100) == pytest.approx(1e-4)


def test_tiny_model_overfits_a_few_demonstrations(tmp_path):
    data_dir = write_data(tmp_path / "data", DEMOS, DEMOS)
    cfg = sft_tiny_config(tmp_path, data_dir, max_steps=40, lr=1e-2, min_lr=1e-3, warmup_steps=10,
                          eval_interval=40)
    result = sft.train(cfg)
    print(f"train loss {result['train_loss']:.4f}, val loss {result['val_loss']:.4f}")
    assert result["train_loss"] < 0.05 and result["val_loss"] < 0.05  # val = train here: memorised


def test_train_writes_checkpoints_plot_and_metrics(tmp_path):
    data_dir = write_data(tmp_path / "data", DEMOS * 3, DEMOS[:2])
    result = sft.train(sft_tiny_config(tmp_path, data_dir, max_steps=10, eval_interval=5,
                                       grad_accum=2))
    for key in ("ckpt_path", "last_path", "metrics_path", "plot_path"):
        assert os.path.isfile(result[key]), key
    rows = [json.loads(line) for line in open(result["metrics_path"])]
    assert [r["step"] for r in rows] == list(range(11))
    assert [r["step"] for r in rows if "val_loss" in r] == [0, 5, 10]
    assert rows[-1]["val_loss"] < rows[0]["val_loss"]
    model, ckpt = load_model(result["ckpt_path"])
    assert isinstance(model, GPT) and ckpt["config"]["n_embd"] == 64
    assert ckpt["val_loss"] == result["best_val_loss"]
    assert torch.load(result["last_path"], weights_only=True)["step"] == 10
    if os.path.isfile(os.path.join(REPO, "sample.py")):
        out = subprocess.run([sys.executable, "sample.py", "--init_from", result["ckpt_path"],
                              "--prompt", "Hello", "--max_new_tokens", "5", "--device", "cpu"],
                             cwd=REPO, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr


def test_train_on_shared_hh_data(hh_prepared, tmp_path):
    cfg = sft_tiny_config(tmp_path, hh_prepared, max_prompt_tokens=96, max_response_tokens=32,
                          batch_size=8, max_steps=8, eval_interval=8, eval_examples=16)
    result = sft.train(cfg)
    rows = [json.loads(line) for line in open(result["metrics_path"])]
    assert rows[-1]["val_loss"] < rows[0]["val_loss"]


def test_clear_errors_for_missing_data_and_small_block_size(tmp_path):
    with pytest.raises(SystemExit, match="not found"):
        sft.train(sft_tiny_config(tmp_path, str(tmp_path / "nowhere")))
    data_dir = write_data(tmp_path / "data", DEMOS, DEMOS)
    with pytest.raises(UsageError, match="block_size"):
        sft.train(sft_tiny_config(tmp_path, data_dir, block_size=64, max_prompt_tokens=48,
                                  max_response_tokens=24))


def sft_case():
    """A 1-layer GPT and 4 demonstrations (tokens, prompt length) of unequal lengths,
    ending in EOS."""
    torch.manual_seed(3)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=32, vocab_size=EOS + 1))
    examples = [(torch.randint(0, EOS, (n,)).tolist() + [EOS], p)
                for n, p in ((12, 5), (7, 3), (20, 11), (9, 8))]
    return model, examples


def whole_batch_loss_and_grads(model, examples):
    x, y, loss_mask = sft.collate(examples)
    loss = sft.sft_loss(token_logprobs(model(x), y), loss_mask)
    return loss.item(), gradients(loss, list(model.parameters()))


def test_gradient_accumulation_equals_one_big_batch():
    model, examples = sft_case()
    # 1 + 3 rows: unequal token counts
    micro = [sft.collate(examples[:1]), sft.collate(examples[1:])]
    loss = sft.accumulate_gradients(model.transformer, model, micro, contextlib.nullcontext())
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    x, y, loss_mask = sft.collate(examples)
    big = sft.sft_loss(token_logprobs(model(x), y), loss_mask)
    big.backward()
    assert loss == pytest.approx(big.item(), abs=1e-5)
    for g, p in zip(grads, model.parameters()):
        torch.testing.assert_close(g, p.grad, atol=1e-6, rtol=1e-4)


def test_sft_step_of_a_single_response_token_is_that_tokens_nll():
    """One micro-batch whose only response token is the EOS after the prompt: the step's loss is its
    NLL."""
    model, _ = sft_case()
    example = ([3, 4, 5, EOS], 3)  # prompt of 3 tokens, response = EOS alone
    loss = sft.accumulate_gradients(model.transformer, model, [sft.collate([example])],
                                    contextlib.nullcontext())
    with torch.no_grad():
        logits = model(torch.tensor([[3, 4, 5]]))[0, -1]
        expected = -torch.log_softmax(logits.double(), -1)[EOS].item()
    assert loss == pytest.approx(expected, abs=1e-5)


def test_sft_step_on_one_of_two_identical_ranks_is_the_single_process_step(monkeypatch):
    """Under torchrun each rank weighs its micro-batches by world_size / (tokens of all ranks), and
    DDP averages the ranks' gradients: with a second rank holding the same micro-batches
    (all_reduce_sum doubles, world 2), this rank's gradient and the returned loss are those of one
    process running the step alone."""
    model, examples = sft_case()
    micro = [sft.collate(examples[:1]), sft.collate(examples[1:])]
    expected_loss, expected_grads = whole_batch_loss_and_grads(model, examples)
    # lib.ddp's token count (step_total) and the step's statistics over the ranks
    monkeypatch.setattr(lib.ddp, "get_world_size", lambda: 2)
    monkeypatch.setattr(lib.ddp, "all_reduce_sum", lambda x: [2 * v for v in x]
                        if isinstance(x, list) else 2 * x)
    loss = sft.accumulate_gradients(model.transformer, model, micro, contextlib.nullcontext())
    assert loss == pytest.approx(expected_loss, abs=1e-5)
    assert_close_grads([p.grad for p in model.parameters()], expected_grads)


def test_sft_step_syncs_ddp_gradients_once_after_the_last_micro_batch(monkeypatch):
    model, examples = sft_case()
    recorder = NoSyncRecorder()
    monkeypatch.setattr(lib.ddp, "no_sync", recorder)
    micro = [sft.collate(examples[:1]), sft.collate(examples[1:3]), sft.collate(examples[3:])]
    sft.accumulate_gradients(model.transformer, model, micro, contextlib.nullcontext())
    blocks = (model.transformer,)
    assert recorder.calls == [(blocks, True), (blocks, True), (blocks, False)]


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_resume_after_a_crash_continues_exactly_as_an_uninterrupted_run(
        tmp_path, monkeypatch, lora_rank):
    # 4 steps == 2 + 2 resumed: the crash comes at step 4, between the checkpoints of steps 2 and 4,
    # so the resumed run also has to drop the metrics row of step 3 and redo it. Dropout on (random
    # state), and batches of 3 x 2 over 8 demonstrations cross epochs inside a step (data position).
    # With LoRA the checkpoints hold adapters, rebuilt on the base for the resumed run.
    data_dir = write_data(tmp_path / "data", DEMOS * 2, DEMOS[:2])
    kw = dict(max_steps=4, eval_interval=2, batch_size=3, grad_accum=2, dropout=0.1)
    if lora_rank:
        torch.manual_seed(0)
        base = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=128))
        kw.update(init_from=save_checkpoint(str(tmp_path / "base.pt"), base, sft.Config()),
                  lora_rank=lora_rank, lora_dropout=0.1, lr=1e-2)
    full = sft.train(sft_tiny_config(tmp_path / "full", data_dir, **kw))

    def crash_at_step_4(step, *args):  # train() asks lr_at(step - 1) at the start of each step
        if step == 3:
            raise RuntimeError("simulated crash")
        return lr_at(step, *args)
    cfg = sft_tiny_config(tmp_path / "resumed", data_dir, **kw)
    with monkeypatch.context() as m:
        m.setattr(sft, "lr_at", crash_at_step_4)
        with pytest.raises(RuntimeError, match="simulated crash"):
            sft.train(cfg)
    metrics = os.path.join(cfg.out_dir, "metrics.jsonl")
    assert [json.loads(line)["step"] for line in open(metrics)] == list(range(4))
    resumed = sft.train(dataclasses.replace(cfg, resume=True))

    timings = ("tok_per_s", "ms_per_step")
    untimed = lambda path: [{k: v for k, v in json.loads(line).items() if k not in timings}
                            for line in open(path)]
    # one row per step, equal floats
    assert untimed(resumed["metrics_path"]) == untimed(full["metrics_path"])
    assert resumed["best_step"] == full["best_step"] and resumed["val_loss"] == full["val_loss"]
    for key in ("ckpt_path", "last_path"):  # the best and the last checkpoint, bit for bit
        a, b = torch.load(full[key], weights_only=True), torch.load(resumed[key], weights_only=True)
        assert a["step"] == b["step"]
        for name in a["model"]:
            assert torch.equal(a["model"][name], b["model"][name]), (key, name)
    a = torch.load(full["last_path"], weights_only=True)
    b = torch.load(resumed["last_path"], weights_only=True)
    for i, state in a["optimizer"]["state"].items():
        assert all(torch.equal(v, b["optimizer"]["state"][i][k]) for k, v in state.items())
