"""Scaling up by a flag: LoRA adapters (model.py, Hu et al. 2021) against the base model and
their merged weights, LoRA checkpoints rebuilt on their base, PPO with two networks instead of
four (resumed bit for bit), frozen weights in bf16, and the policy's EMA against a hand
computation of its recursion."""
import dataclasses
import json
import os

import pytest
import torch

import export
import ppo
import reward
import sft
from conftest import (
    DEMOS,
    REWARD_TINY,
    ppo_models,
    ppo_tiny_config,
    reward_tiny_config,
    score_fn,
    sft_tiny_config,
    synthetic_preferences,
    write_data,
    write_jsonl,
)
from lib.checkpoints import load_model, lora_base, save_checkpoint
from model import (
    GPT,
    GPTConfig,
    LoRALinear,
    ScalarGPT,
    add_lora,
    lora_state_dict,
    merged_state_dict,
    share_weights,
)

SHAPE = dict(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=97)


def randomise_adapters(model, seed=0):
    """Adapters as training would leave them: B != 0 (at the start B = 0 and
    they change nothing)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, LoRALinear):
            m.lora_B.data = torch.randn(m.lora_B.shape, generator=g) * 0.1


@pytest.mark.parametrize("cls", [GPT, ScalarGPT])
def test_lora_starts_at_the_base_model_and_merges_to_its_own_outputs(cls):
    torch.manual_seed(0)
    base = cls(GPTConfig(**SHAPE))
    x, mask = torch.randint(0, 97, (3, 12)), torch.ones(3, 12, dtype=torch.long)
    mask[0, :4] = 0  # left padding
    expected = base(x, mask).detach()
    model = add_lora(share_weights(base), rank=4, alpha=8.0)
    assert torch.equal(model(x, mask), expected)  # B = 0: exactly the base model
    randomise_adapters(model)
    adapted = model(x, mask).detach()
    assert (adapted - expected).abs().max() > 1e-3
    # the base network itself is untouched: its adapters are off
    assert torch.equal(base(x, mask), expected)
    merged = cls(GPTConfig(**SHAPE))
    merged.load_state_dict(merged_state_dict(model))
    torch.testing.assert_close(merged(x, mask), adapted, atol=1e-5, rtol=1e-5)
    scale = 8.0 / 4
    layer = model.transformer.h[1].mlp.c_fc
    by_hand = layer.weight + scale * layer.lora_B @ layer.lora_A  # W + (alpha / r) B A
    torch.testing.assert_close(merged.transformer.h[1].mlp.c_fc.weight, by_hand)


def test_only_adapters_and_unfrozen_heads_get_gradients():
    torch.manual_seed(0)
    model = add_lora(ScalarGPT(GPTConfig(**SHAPE)), rank=2, alpha=2.0)
    model.score_head.requires_grad_(True)
    randomise_adapters(model)
    model(torch.randint(0, 97, (2, 8))).sum().backward()
    with_grad = {name for name, p in model.named_parameters() if p.grad is not None}
    assert with_grad == {name for name, _ in model.named_parameters()
                         if "lora_" in name or name.startswith("score_")}
    # c_attn, attn/mlp c_proj, c_fc
    assert len([n for n in with_grad if "lora_A" in n]) == 4 * SHAPE["n_layer"]
    assert set(lora_state_dict(model)) == with_grad


def test_a_lora_checkpoint_holds_adapters_and_loads_merged(tmp_path):
    torch.manual_seed(0)
    base_path = save_checkpoint(str(tmp_path / "base.pt"), GPT(GPTConfig(**SHAPE)), sft.Config())
    model = add_lora(load_model(base_path)[0], rank=4, alpha=4.0)
    randomise_adapters(model, seed=3)
    path = save_checkpoint(str(tmp_path / "lora.pt"), model, sft.Config(),
                           base=lora_base(base_path))
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["lora"]["rank"] == 4 and ckpt["lora"]["base"] == base_path
    assert all("lora_" in k for k in ckpt["model"])  # adapters only: the base stays in base.pt
    x = torch.randint(0, 97, (2, 10))
    merged, _ = load_model(path)
    assert type(merged) is GPT and not any(isinstance(m, LoRALinear) for m in merged.modules())
    torch.testing.assert_close(merged(x), model(x), atol=1e-5, rtol=1e-5)
    attached, _ = load_model(path, adapters=True)  # a stage resuming its own LoRA run
    assert torch.equal(attached(x), model(x))


def run_ppo(out, **kw):
    return ppo.train(ppo_tiny_config(out, lora_rank=4, lora_alpha=8.0, **kw))


def test_lora_ppo_holds_two_networks_and_trains_only_adapters(tmp_path, monkeypatch):
    """The reference policy is the policy's own network with its adapters off and the critic the
    reward model's with its own adapters and value head: the frozen weights are shared tensors, not
    copies, and stay as they were while the adapters learn."""
    built = {}
    build = ppo.build_models

    def spy(*args, **kwargs):
        built["models"] = build(*args, **kwargs)
        built["before"] = {k: v.clone() for k, v in built["models"][1].state_dict().items()}
        return built["models"]
    monkeypatch.setattr(ppo, "build_models", spy)
    result = run_ppo(tmp_path, iters=2)
    policy, ref_policy, reward_model, critic = built["models"]
    assert policy.transformer.wte.weight is ref_policy.transformer.wte.weight
    c_attn = lambda model: model.transformer.h[0].attn.c_attn.weight
    assert c_attn(critic) is c_attn(reward_model)
    assert critic.score_head.weight is not reward_model.score_head.weight
    named = list(policy.named_parameters()) + list(critic.named_parameters())
    trained = {n for n, p in named if p.requires_grad}
    assert trained and all("lora_" in n or n.startswith("score_head") for n in trained)
    for k, v in ref_policy.state_dict().items():
        assert torch.equal(v, built["before"][k]), k  # the shared base never moved
    # the adapters did
    assert any(p.abs().sum() > 0 for n, p in policy.named_parameters() if "lora_B" in n)
    assert all(torch.isfinite(torch.tensor(result[k])) for k in ("pg_loss", "vf_loss"))


def test_lora_ppo_resumes_bit_for_bit_with_ema(tmp_path, monkeypatch):
    kw = dict(iters=4, eval_interval=2, batch_size=4, minibatch_size=2, noptepochs=1, ema_decay=0.8)
    full = run_ppo(tmp_path / "full", **kw)
    prompt_batch = ppo.prompt_batch

    def crash_in_iteration_4(prompts, batch_size, iteration, *args):
        if iteration == 3:
            raise RuntimeError("simulated crash")
        return prompt_batch(prompts, batch_size, iteration, *args)
    with monkeypatch.context() as m:
        m.setattr(ppo, "prompt_batch", crash_in_iteration_4)
        with pytest.raises(RuntimeError, match="simulated crash"):
            run_ppo(tmp_path / "resumed", **kw)
    resumed = run_ppo(tmp_path / "resumed", resume=True, **kw)
    untimed = lambda path: [{k: v for k, v in json.loads(line).items() if not k.startswith("t_")}
                            for line in open(path)]
    assert untimed(resumed["metrics_path"]) == untimed(full["metrics_path"])
    a = torch.load(full["ckpt_path"], weights_only=True)
    b = torch.load(resumed["ckpt_path"], weights_only=True)
    for part in ("model", "critic", "trained"):
        assert set(a[part]) == set(b[part]), part
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part
    # the EMA is not the weights
    assert any(not torch.equal(a["model"][k], a["trained"][k]) for k in a["model"])


def test_ema_follows_its_recursion_step_by_step(tmp_path, monkeypatch):
    """ppo_update with --ema_decay 0.7: after each optimizer step ema = 0.7 ema + 0.3 theta, checked
    against the weights recorded after every step."""
    cfg = ppo_tiny_config(tmp_path, lora_rank=2, lora_alpha=4.0, ema_decay=0.7, batch_size=4,
                          minibatch_size=2, noptepochs=2)
    device = torch.device("cpu")
    policy, ref_policy, reward_model, critic = ppo.build_models(cfg, device)
    queries = torch.randint(0, 50000, (4, 5))
    batch, _ = ppo.rollout(ppo_models(policy, ref_policy, critic, reward_model), queries,
                           torch.ones_like(queries), cfg, 0.05,
                           generator=torch.Generator().manual_seed(0))
    optimizer = ppo.make_optimizer(policy, critic, cfg, device)
    trained = {k: p for k, p in policy.named_parameters() if p.requires_grad}
    ema = {k: p.detach().clone() for k, p in trained.items()}
    expected = {k: p.detach().clone() for k, p in trained.items()}
    step = optimizer.step

    def step_and_record(*args, **kwargs):
        out = step(*args, **kwargs)
        for k, p in trained.items():
            expected[k] = 0.7 * expected[k] + 0.3 * p.detach()
        return out
    monkeypatch.setattr(optimizer, "step", step_and_record)
    ppo.ppo_update(policy, critic, optimizer, batch, cfg,
                   generator=torch.Generator().manual_seed(1), ema=ema)
    for k in trained:
        torch.testing.assert_close(ema[k], expected[k], atol=1e-7, rtol=1e-6)
    assert any(not torch.equal(ema[k], trained[k]) for k in trained)


def test_frozen_weights_are_stored_in_bf16_and_trained_ones_in_float32(tmp_path, monkeypatch):
    built = {}
    build = ppo.build_models
    monkeypatch.setattr(ppo, "build_models", lambda *a, **k: built.setdefault("m", build(*a, **k)))
    result = run_ppo(tmp_path, iters=1, dtype="bfloat16")
    policy, ref_policy, reward_model, critic = built["m"]
    for model in (policy, critic):
        for name, p in model.named_parameters():
            assert p.dtype == (torch.float32 if p.requires_grad else torch.bfloat16), name
    frozen = list(ref_policy.parameters()) + list(reward_model.parameters())
    assert all(p.dtype == torch.bfloat16 for p in frozen)
    assert all(torch.isfinite(torch.tensor(result[k])) for k in ("pg_loss", "vf_loss"))
    saved = torch.load(result["ckpt_path"], weights_only=True)
    assert all(v.dtype == torch.float32 for v in saved["model"].values())


def test_lora_sft_trains_adapters_and_hands_on_a_plain_model(tmp_path):
    torch.manual_seed(0)
    data_dir = write_data(tmp_path / "data", DEMOS, DEMOS)
    base = save_checkpoint(str(tmp_path / "base.pt"),
                           GPT(GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=128)),
                           sft.Config())
    cfg = sft_tiny_config(tmp_path, data_dir, init_from=base, lora_rank=4, lora_alpha=8.0,
                          max_steps=6, lr=1e-2, eval_interval=3)
    result = sft.train(cfg)
    ckpt = torch.load(os.path.join(cfg.out_dir, "ckpt.pt"), weights_only=True)
    assert ckpt["lora"]["base"] == base and all("lora_" in k for k in ckpt["model"])
    one_step = sft.train(dataclasses.replace(cfg, max_steps=1, out_dir=str(tmp_path / "o1")))
    assert result["val_loss"] < one_step["val_loss"]
    merged, _ = load_model(os.path.join(cfg.out_dir, "ckpt.pt"))  # what reward.py and ppo.py load
    assert type(merged) is GPT


def test_a_lora_checkpoint_exports_its_merged_weights(tmp_path):
    torch.manual_seed(0)
    shape = dict(SHAPE, vocab_size=50257)
    base_path = save_checkpoint(str(tmp_path / "base.pt"), GPT(GPTConfig(**shape)), sft.Config())
    model = add_lora(load_model(base_path)[0], rank=2, alpha=4.0)
    randomise_adapters(model, seed=5)
    path = save_checkpoint(str(tmp_path / "lora.pt"), model, sft.Config(),
                           base=lora_base(base_path))
    folder = export.export(export.Config(init_from=path, out_dir=str(tmp_path / "hf")))
    exported, _ = load_model(folder)  # the Hugging Face folder, read back
    x = torch.randint(0, 50257, (2, 9))
    torch.testing.assert_close(exported(x), model(x), atol=1e-5, rtol=1e-5)


def test_lora_reward_model_trains_adapters_and_head_on_the_sft_trunk(tmp_path):
    write_jsonl(tmp_path / "comparisons_train.jsonl", synthetic_preferences(64, seed=0))
    val = synthetic_preferences(16, seed=1)
    write_jsonl(tmp_path / "comparisons_val.jsonl", val)
    write_jsonl(tmp_path / "sft_val.jsonl",
                [{"prompt": r["prompt"], "response": r["chosen"]} for r in val])
    torch.manual_seed(0)
    shape = {k: REWARD_TINY[k] for k in ("n_layer", "n_head", "n_embd", "block_size")}
    base = save_checkpoint(str(tmp_path / "sft.pt"), GPT(GPTConfig(**shape)), sft.Config())
    result = reward.train(reward_tiny_config(tmp_path, init_from=base, lora_rank=4, lora_alpha=8.0,
                                             max_steps=8, eval_interval=4))
    ckpt = torch.load(result["ckpt_path"], weights_only=True)
    assert ckpt["lora"]["base"] == base and ckpt["lora"]["base_transplant"]
    adapters = {k for k in ckpt["model"] if "lora_" in k}
    assert set(ckpt["model"]) == adapters | {"score_head.weight", "score_head.bias"}
    # normalised, merged: what ppo.py and label.py load
    rm, _ = load_model(result["ckpt_path"], "scalar")
    assert type(rm) is ScalarGPT and torch.equal(rm.score_head.bias,
                                                 ckpt["model"]["score_head.bias"])


def test_lora_ppo_with_a_programmatic_reward_gives_the_critic_its_own_base(tmp_path, monkeypatch):
    """No reward model to share: the critic's frozen trunk comes from --reward_ckpt, with adapters
    and a head."""
    built = {}
    build = ppo.build_models
    monkeypatch.setattr(ppo, "build_models", lambda *a, **k: built.setdefault("m", build(*a, **k)))
    result = ppo.train(ppo_tiny_config(tmp_path, lora_rank=2, iters=1), reward_fn=score_fn)
    policy, ref_policy, reward_model, critic = built["m"]
    assert reward_model is None and any(isinstance(m, LoRALinear) for m in critic.modules())
    trained = {n for n, p in critic.named_parameters() if p.requires_grad}
    assert trained == {n for n, _ in critic.named_parameters()
                       if "lora_" in n or n.startswith("score_head")}
    assert torch.isfinite(torch.tensor(result["vf_loss"]))


def test_full_finetuning_saves_the_ema_as_the_policy_every_script_loads(tmp_path, monkeypatch):
    """Without LoRA (--ema_decay on every weight, as the paper's full fine-tuning), ckpt.pt's
    policy, as load_model gives it to sample.py and the evaluation, is the EMA of the weights
    after every optimizer step, starting at the initial policy; the trained weights are kept
    beside it for --resume."""
    decay, record = 0.6, {}
    make_optimizer = ppo.make_optimizer

    def recording_optimizer(policy, critic, cfg, device):
        optimizer = make_optimizer(policy, critic, cfg, device)
        trained = {k: p for k, p in policy.named_parameters() if p.requires_grad}
        record["ema"] = {k: p.detach().clone() for k, p in trained.items()}
        step = optimizer.step

        def step_and_average(*args, **kwargs):
            out = step(*args, **kwargs)
            for k, p in trained.items():
                record["ema"][k] = decay * record["ema"][k] + (1 - decay) * p.detach()
            return out
        optimizer.step = step_and_average
        return optimizer
    monkeypatch.setattr(ppo, "make_optimizer", recording_optimizer)
    result = ppo.train(ppo_tiny_config(tmp_path, ema_decay=decay, iters=2, batch_size=4,
                                       minibatch_size=2))
    policy = load_model(result["ckpt_path"], "gpt")[0].state_dict()
    trained = torch.load(result["ckpt_path"], weights_only=True)["trained"]
    assert set(record["ema"]) <= set(policy) and len(record["ema"]) > 10
    for k, average in record["ema"].items():
        torch.testing.assert_close(policy[k], average, atol=1e-6, rtol=1e-5)
    assert any(not torch.equal(policy[k], trained[k]) for k in record["ema"])
