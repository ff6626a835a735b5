"""export.py against transformers: the exported policy gives the same logits and greedy tokens,
its tokenizer encodes like tiktoken, and an exported reward model reads back into this project
with the same scores."""
import json
import os
from dataclasses import dataclass

import pytest
import torch

import export
from lib.checkpoints import load_model, save_checkpoint
from lib.tokens import get_tokenizer
from model import GPT, GPTConfig, ScalarGPT

transformers = pytest.importorskip("transformers")
SHAPE = GPTConfig(block_size=64, vocab_size=50257, n_layer=2, n_head=2, n_embd=32)
TEXTS = ["\n\nHuman: Hello, how are you?\n\nAssistant: I'm fine!  Thanks.",
         "naïve café — 東京 🤖\t tabs   spaces\r\nand 1234567 3.14, it's they're we've I'll",
         "   leading spaces", "trailing   ", "line\n\n\nbreaks\n"]


@dataclass
class RunConfig:
    max_prompt_tokens: int = 40
    max_response_tokens: int = 16


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny policy and reward model with GPT-2's vocabulary, saved as checkpoints and exported."""
    tmp = tmp_path_factory.mktemp("export")
    torch.manual_seed(0)
    policy = GPT(SHAPE).eval()
    reward_model = ScalarGPT(SHAPE).eval()
    with torch.no_grad():
        reward_model.score_head.bias.fill_(-0.25)  # as if normalised by reward.py
    paths = {}
    for name, model, extra in (("policy", policy, {}),
                               ("reward", reward_model, {"reward_shift": -0.25})):
        ckpt = save_checkpoint(str(tmp / name / "ckpt.pt"), model, RunConfig(), **extra)
        paths[name] = export.export(export.Config(init_from=ckpt, out_dir=str(tmp / name / "hf")))
    return policy, reward_model, paths


def test_exported_policy_matches_transformers_logits_and_greedy(exported):
    policy, _, paths = exported
    assert {"config.json", "model.safetensors", "generation_config.json", "vocab.json",
            "merges.txt"} <= \
        set(os.listdir(paths["policy"]))
    hf = transformers.AutoModelForCausalLM.from_pretrained(paths["policy"]).eval()
    idx = torch.randint(0, 50257, (3, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (hf(idx).logits - policy(idx)).abs().max().item()
        print(f"max abs logit diff, exported policy in transformers vs checkpoint: {diff:.2e}")
        assert diff < 1e-4
        theirs = hf.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=12,
                             do_sample=False, eos_token_id=None, pad_token_id=50256)
    assert torch.equal(policy.generate(idx, 12, temperature=0.0), theirs)


@pytest.mark.parametrize("fast", [True, False])
def test_exported_tokenizer_encodes_like_tiktoken(exported, fast):
    _, _, paths = exported
    cls = transformers.GPT2TokenizerFast if fast else transformers.GPT2Tokenizer
    tok = cls.from_pretrained(paths["policy"])
    enc = get_tokenizer()
    # that one is special
    source = open(export.__file__, encoding="utf-8").read().replace("<|endoftext|>", "")
    for text in TEXTS + [source]:
        ids = enc.encode_ordinary(text)
        assert tok.encode(text) == ids
        assert tok.decode(ids) == text
    assert tok.eos_token_id == 50256 and tok.encode("<|endoftext|>") == [50256]


def test_exported_reward_model_reads_back_with_same_scores(exported):
    _, reward_model, paths = exported
    config = json.load(open(os.path.join(paths["reward"], "config.json")))
    assert config["instructgpt"]["kind"] == "scalar"
    assert config["instructgpt"]["reward_shift"] == -0.25
    loaded, ckpt = load_model(paths["reward"], kind="scalar")
    # the budgets sample.py uses
    assert ckpt["config"] == {"max_prompt_tokens": 40, "max_response_tokens": 16}
    idx = torch.randint(0, 50257, (2, 15), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(idx), reward_model(idx), atol=1e-6, rtol=0)
        # transformers reads the trunk (GPT-2 names); the exported head on its hidden states
        # gives the scores
        trunk = transformers.GPT2Model.from_pretrained(paths["reward"]).eval()
        from safetensors.torch import load_file
        head = load_file(os.path.join(paths["reward"], "model.safetensors"))
        hidden = trunk(idx).last_hidden_state
        scores = hidden @ head["score_head.weight"].T + head["score_head.bias"]
        torch.testing.assert_close(scores.squeeze(-1), reward_model(idx), atol=1e-5, rtol=0)


def test_exported_policy_folder_loads_back_as_policy_and_as_reward_trunk(exported):
    policy, _, paths = exported
    loaded, ckpt = load_model(paths["policy"], kind="gpt")
    assert ckpt["kind"] == "gpt"
    idx = torch.randint(0, 50257, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(loaded.eval()(idx), policy(idx))
    # not a reward model as it is
    with pytest.raises(SystemExit, match="a reward model .* is expected"):
        load_model(paths["policy"], kind="scalar")
    # reward.py's start (fresh head)
    trunk, _ = load_model(paths["policy"], kind="scalar", transplant=True)
    for k, v in policy.transformer.state_dict().items():
        assert torch.equal(trunk.transformer.state_dict()[k], v)
