"""model.py against references: transformers' GPT-2, recomputation without cache, unpadded runs."""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import REPO
from model import GPT, GPTConfig, ScalarGPT, sample_token, token_logprobs

TINY = GPTConfig(block_size=64, vocab_size=97, n_layer=2, n_head=4, n_embd=32)


def tiny_gpt(seed=0, config=TINY):
    torch.manual_seed(seed)
    return GPT(config).eval()


def left_padded_batch(lengths, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    idx = torch.full((len(lengths), T), vocab - 1, dtype=torch.long)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for i, n in enumerate(lengths):
        idx[i, T - n:] = torch.randint(0, vocab - 1, (n,), generator=g)
        mask[i, T - n:] = 1
    return idx, mask


def test_left_padded_logits_equal_unpadded():
    model = tiny_gpt()
    idx, mask = left_padded_batch([5, 12, 1, 9], TINY.vocab_size)
    with torch.no_grad():
        batched = model(idx, mask)
        for i, n in enumerate(mask.sum(1).tolist()):
            alone = model(idx[i:i + 1, -n:])
            torch.testing.assert_close(batched[i:i + 1, -n:], alone, atol=1e-5, rtol=1e-5)


def test_kv_cache_greedy_equals_recomputation_left_padded():
    model = tiny_gpt(1)
    idx, mask = left_padded_batch([3, 10, 7], TINY.vocab_size, seed=1)
    with torch.no_grad():
        cached = model.generate(idx, 30, temperature=0.0, attention_mask=mask)
        recomputed = model.generate(idx, 30, temperature=0.0, attention_mask=mask, use_cache=False)
    assert cached.shape == (3, idx.size(1) + 30)
    assert torch.equal(cached, recomputed)
    # and each row equals that prompt generated alone, without padding
    for i, n in enumerate(mask.sum(1).tolist()):
        alone = model.generate(idx[i:i + 1, -n:], 30, temperature=0.0)
        assert torch.equal(cached[i, -(n + 30):], alone[0])


def test_kv_cache_sampling_equals_recomputation_with_same_seed():
    model = tiny_gpt(2)
    idx, mask = left_padded_batch([4, 8], TINY.vocab_size, seed=2)
    a = model.generate(idx, 20, attention_mask=mask, generator=torch.Generator().manual_seed(5))
    b = model.generate(idx, 20, attention_mask=mask, use_cache=False,
                       generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


def test_fixed_seed_reproduces_samples():
    model = tiny_gpt(3)
    idx, mask = left_padded_batch([4, 8], TINY.vocab_size)
    runs = [model.generate(idx, 16, temperature=1.0, top_p=0.9, attention_mask=mask,
                           generator=torch.Generator().manual_seed(7)) for _ in range(2)]
    other = model.generate(idx, 16, temperature=1.0, top_p=0.9, attention_mask=mask,
                           generator=torch.Generator().manual_seed(8))
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], other)


def test_eos_stops_rows_and_generation():
    # a 5-token vocabulary sampled at high temperature: every row emits the EOS id 4 sooner or later
    model = tiny_gpt(4, GPTConfig(block_size=128, vocab_size=5, n_layer=1, n_head=2, n_embd=16))
    idx = torch.randint(0, 4, (6, 3), generator=torch.Generator().manual_seed(0))
    out = model.generate(idx, 100, temperature=2.0, eos_token_id=4,
                         generator=torch.Generator().manual_seed(0))
    assert out.size(1) < 3 + 100, "generation should stop once every row has emitted EOS"
    for row in out[:, 3:].tolist():
        first = row.index(4)
        assert all(t == 4 for t in row[first:]), "a row keeps emitting EOS after its first EOS"
    assert (out[:, -1] == 4).all()
    # rows before their EOS are the same tokens as without an EOS id (same random draws)
    free = model.generate(idx, out.size(1) - 3, temperature=2.0,
                          generator=torch.Generator().manual_seed(0))
    for a, b in zip(out[:, 3:].tolist(), free[:, 3:].tolist()):
        n = a.index(4) + 1
        assert a[:n] == b[:n]


def test_top_k_and_top_p_never_leave_the_allowed_set():
    torch.manual_seed(0)
    logits = torch.randn(1, 50) * 2
    rows = logits.expand(4000, -1)
    g = torch.Generator().manual_seed(0)
    allowed_k = set(torch.topk(logits[0], 5).indices.tolist())
    assert set(sample_token(rows, top_k=5, generator=g).tolist()) <= allowed_k
    probs, order = logits[0].softmax(-1).sort(descending=True)
    n_keep = int((probs.cumsum(0) < 0.6).sum()) + 1  # smallest prefix whose mass reaches 0.6
    allowed_p = set(order[:n_keep].tolist())
    drawn = set(sample_token(rows, top_p=0.6, generator=g).tolist())
    assert drawn <= allowed_p and len(drawn) == len(allowed_p)
    # the most likely always survives
    assert sample_token(logits, top_p=1e-6).item() == logits.argmax().item()


def test_sampling_follows_the_softmax_distribution():
    logits = torch.tensor([[0.0, 1.0, 2.0, -1.0, 0.5]])
    draws = sample_token(logits.expand(40000, -1), temperature=0.7,
                         generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=5).float() / draws.numel()
    torch.testing.assert_close(freq, (logits[0] / 0.7).softmax(-1), atol=0.01, rtol=0)


def test_token_logprobs_match_log_softmax():
    logits = torch.randn(2, 6, 11)
    tokens = torch.randint(0, 11, (2, 6))
    for temperature in (1.0, 0.7):
        ref = F.log_softmax(logits / temperature, -1).gather(-1, tokens[..., None]).squeeze(-1)
        torch.testing.assert_close(token_logprobs(logits, tokens, temperature), ref)


def test_too_long_prompt_raises_clear_error():
    model = tiny_gpt()
    with pytest.raises(ValueError, match="exceeds block_size"):
        model.generate(torch.zeros(1, 60, dtype=torch.long), 10)
    with pytest.raises(ValueError, match="exceeds block_size"):
        model(torch.zeros(1, 65, dtype=torch.long))


@pytest.fixture(scope="module")
def hf_gpt2(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=1000, n_positions=128,
                                  bos_token_id=999, eos_token_id=999)
    hf = transformers.GPT2LMHeadModel(cfg).eval()
    folder = tmp_path_factory.mktemp("hf_gpt2")
    hf.save_pretrained(folder)
    return hf, str(folder)


def test_gpt2_import_matches_transformers_logits_and_greedy(hf_gpt2):
    hf, folder = hf_gpt2
    ours = GPT.from_pretrained(folder).eval()
    idx = torch.randint(0, 999, (3, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (hf(idx).logits - ours(idx)).abs().max().item()
        print(f"max abs logit diff vs transformers: {diff:.2e}")
        assert diff < 1e-4
        theirs = hf.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=20,
                             do_sample=False, pad_token_id=999, eos_token_id=None)
    assert torch.equal(ours.generate(idx, 20, temperature=0.0), theirs)


def hub_cache_with(folder, cache, repo="gpt2", revision="0123456789abcdef0123456789abcdef01234567"):
    """Lay out `cache` as the Hugging Face hub client does: models--<repo>/snapshots/<rev>/<files>,
    refs/main."""
    snapshot = cache / f"models--{repo}" / "snapshots" / revision
    snapshot.mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        (snapshot / name).write_bytes(open(os.path.join(folder, name), "rb").read())
    (cache / f"models--{repo}" / "refs").mkdir()
    (cache / f"models--{repo}" / "refs" / "main").write_text(revision)
    return snapshot


def load_offline(name, cache):
    """lib.checkpoints.load_model(name) in a fresh process with
    HF_HUB_OFFLINE=1 and HF_HUB_CACHE=cache."""
    code = (f"from lib.checkpoints import load_model; m, _ = load_model({name!r}); "
            "print(m.config.n_layer, m.config.n_embd, float(m.transformer.wte.weight.sum()))")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache),
           "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                          text=True)


# the two names transformers users cache it under
@pytest.mark.parametrize("repo", ["gpt2", "openai-community--gpt2"])
def test_gpt2_name_loads_from_a_warm_hub_cache_offline(hf_gpt2, tmp_path, repo):
    hf, folder = hf_gpt2
    hub_cache_with(folder, tmp_path / "hub", repo)
    run = load_offline("gpt2", tmp_path / "hub")
    assert run.returncode == 0, run.stderr
    n_layer, n_embd, wte_sum = run.stdout.split()
    assert (int(n_layer), int(n_embd)) == (2, 64)
    # the cached weights, not fresh ones
    assert abs(float(wte_sum) - hf.transformer.wte.weight.sum().item()) < 1e-3


def test_offline_without_cached_copy_says_what_to_do(tmp_path):
    run = load_offline("gpt2-medium", tmp_path / "empty")
    assert run.returncode != 0 and "Traceback" not in run.stderr
    assert "not in the Hugging Face cache" in run.stderr and "HF_HUB_OFFLINE is set" in run.stderr
    assert "hf download gpt2-medium config.json model.safetensors" in run.stderr
    assert "--init_from FOLDER" in run.stderr


def test_folder_without_weights_is_refused_clearly(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(SystemExit, match="could not load GPT-2 weights"):
        from lib.checkpoints import load_model
        load_model(str(tmp_path))


def test_scalar_model_loads_trunk_from_a_gpt_checkpoint(tmp_path):
    from dataclasses import dataclass

    from lib.checkpoints import load_model, save_checkpoint

    @dataclass
    class Cfg:
        lr: float = 0.1

    lm = tiny_gpt(5)
    path = save_checkpoint(str(tmp_path / "ckpt.pt"), lm, Cfg())
    rm, ckpt = load_model(path, kind="scalar", transplant=True)  # as reward.py initialises from SFT
    assert isinstance(rm, ScalarGPT) and ckpt["config"] == {"lr": 0.1}
    for k, v in lm.transformer.state_dict().items():
        assert torch.equal(rm.transformer.state_dict()[k], v)
    idx = torch.randint(0, 96, (2, 7))
    assert rm(idx).shape == (2, 7)
    lm2, _ = load_model(path, kind="gpt")
    assert torch.equal(lm2(idx), lm(idx))
    assert json.loads(json.dumps(ckpt["model_config"])) == ckpt["model_config"]


def test_kv_cache_under_bf16_autocast_equals_recomputation():
    # the GPU path (bf16 autocast, cache in bf16) run on CPU
    model = tiny_gpt(6)
    idx, mask = left_padded_batch([4, 10, 7], TINY.vocab_size, seed=6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cached = model.generate(idx, 12, temperature=0.0, attention_mask=mask)
        recomputed = model.generate(idx, 12, temperature=0.0, attention_mask=mask, use_cache=False)
    assert torch.equal(cached, recomputed)
