"""A world's vocabulary (data/lab/prepare.py's vocab.json): the model holds rows for the world's
GPT-2 ids only, the mapping travels in its checkpoints, every script encodes and decodes the same
way with no extra flag, and text outside the vocabulary gets one clear message, never a wrong id."""
import importlib.util
import json
import os
import random
import runpy
import sys

import pytest
import torch

from conftest import REPO
from lib.config import UsageError
from lib.tokens import EOS, get_tokenizer, load_vocab
from model import GPT, GPTConfig, ScalarGPT


def load_prepare():
    spec = importlib.util.spec_from_file_location("lab_prepare_vocab",
                                                  os.path.join(REPO, "data", "lab", "prepare.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    load_prepare().main(["--seed", "2", "--out_dir", str(out), "--quick"])
    return out


def rows(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def world_texts(world):
    corpus = rows(world / "corpus_train.jsonl") + rows(world / "corpus_val.jsonl")
    demos = rows(world / "sft_train.jsonl") + rows(world / "sft_val.jsonl")
    texts = [r["response"] for r in corpus]
    texts += [r["prompt"] + r["response"] for r in demos]
    texts += [r["prompt"] for name in ("label", "train", "val")
              for r in rows(world / f"prompts_{name}.jsonl")]
    return texts


def test_world_text_round_trips_through_the_world_vocabulary(world):
    vocab = load_vocab(world / "vocab.json")
    gpt2, enc = get_tokenizer(), get_tokenizer(vocab)
    assert EOS in vocab and vocab == sorted(set(vocab)) and 150 < len(vocab) < 400
    for text in world_texts(world):
        ids = enc.encode_ordinary(text)
        assert ids == gpt2.encode_ordinary(text), \
            "the world's own text is GPT-2's tokens, all in the vocabulary"
        assert enc.decode(ids) == text
    # what a model writes: any sequence of the vocabulary's tokens decodes to text that encodes back
    # inside the vocabulary (re-encoding merges some tokens into GPT-2 tokens outside it, which are
    # spelled) and decodes the same
    rng = random.Random(0)
    words = [i for i in vocab if i != EOS]
    for _ in range(300):
        text = gpt2.decode([rng.choice(words) for _ in range(rng.randint(1, 30))])
        ids = enc.encode_ordinary(text)
        assert set(ids) <= set(vocab) and enc.decode(ids) == text, text


def test_out_of_vocabulary_text_gets_one_clear_message_naming_its_characters(world):
    enc = get_tokenizer(load_vocab(world / "vocab.json"))
    with pytest.raises(UsageError, match="characters the world never uses: 'Q' 'z' 'é'"):
        enc.encode_ordinary("Quelle est la capitale du zébu?")


def test_a_model_with_a_world_vocabulary_is_the_full_model_restricted_to_its_rows(world):
    """Reference: a 50257-token model whose output layer is cut to the vocabulary's rows by hand."""
    vocab = load_vocab(world / "vocab.json")
    torch.manual_seed(0)
    full = GPT(GPTConfig(block_size=32, n_layer=2, n_head=2, n_embd=16)).eval()
    small = GPT(GPTConfig(block_size=32, n_layer=2, n_head=2, n_embd=16, vocab=vocab,
                          vocab_size=len(vocab))).eval()
    state = full.state_dict()
    state["transformer.wte.weight"] = state["transformer.wte.weight"][vocab]
    state["lm_head.weight"] = state["transformer.wte.weight"]
    small.load_state_dict(state)
    prompt = "\n\nHuman: What is the capital of"
    ids = torch.tensor([get_tokenizer().encode_ordinary(prompt)])  # (1, T)
    assert set(ids[0].tolist()) <= set(vocab)
    torch.testing.assert_close(small(ids), full(ids)[..., vocab])  # (1, T, V)
    targets = torch.tensor([vocab[5], vocab[-1], vocab[0]] * 3)[None, :ids.size(1)]
    target_rows = small.transformer.rows(targets)[..., None]
    expected = torch.log_softmax(full(ids)[..., vocab], -1).gather(-1, target_rows)
    torch.testing.assert_close(small(ids, targets=targets), expected[..., 0])
    # generation returns GPT-2 ids, the argmax of the restricted logits when greedy
    out = small.generate(ids, 6, temperature=0)
    assert set(out[0].tolist()) <= set(vocab)
    step = small(out[:, :-1])[0, ids.size(1) - 1:]  # (6, V) the logits that chose each new token
    assert [vocab[i] for i in step.argmax(-1).tolist()] == out[0, ids.size(1):].tolist()
    with pytest.raises(ValueError, match="not in this model's vocabulary"):
        small(torch.tensor([[min(set(range(EOS)) - set(vocab))]]))
    assert ScalarGPT(small.config).transformer.wte.weight.shape == (len(vocab), 16)


def run_script(script, args, monkeypatch, capsys, stdin=None):
    monkeypatch.setattr(sys, "argv", [script, *args])
    if stdin is not None:
        import io
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    code, message = 0, ""
    try:
        runpy.run_path(os.path.join(REPO, script), run_name="__main__")
    # sys.exit("error: ...") carries its message, which python would print on stderr
    except SystemExit as e:
        code, message = (1, e.code) if isinstance(e.code, str) else (e.code, "")
    out = capsys.readouterr()
    return code, out.out, out.err + message


@pytest.fixture(scope="module")
def world_ckpt(world, tmp_path_factory):
    """A tiny model pretrained a few steps on the world's corpus with its vocabulary: the
    lab's pretrain step."""
    import sft
    from lib.config import parse_config
    out = tmp_path_factory.mktemp("base")
    cfg = parse_config(sft.Config, sft.CONFIGS, [
        "--init_from", "scratch", "--vocab", str(world / "vocab.json"),
        "--n_layer", "1", "--n_head", "2", "--n_embd", "32", "--block_size", "64", "--dropout", "0",
        "--data_dir", str(world), "--train_file", "corpus_train.jsonl",
        "--val_file", "corpus_val.jsonl", "--out_dir", str(out),
        "--max_prompt_tokens", "1", "--max_response_tokens", "40", "--num_eval_samples", "0",
        "--batch_size", "8", "--grad_accum", "1", "--max_steps", "3", "--eval_interval", "3",
        "--eval_examples", "8", "--device", "cpu"])
    sft.train(cfg)
    return out / "ckpt.pt"


def test_a_world_checkpoint_samples_and_chats_through_sample_py_with_no_extra_flag(world,
                                                                                   world_ckpt,
                                                                                   monkeypatch,
                                                                                      capsys):
    from lib.checkpoints import load_checkpoint
    vocab = load_vocab(world / "vocab.json")
    # the mapping travels in the checkpoint
    assert load_checkpoint(str(world_ckpt))["model_config"]["vocab"] == vocab
    prompt = rows(world / "prompts_val.jsonl")[0]["prompt"].replace("\n", "\\n")
    code, out, err = run_script("sample.py", ["--init_from", str(world_ckpt), "--prompt", prompt,
                                              "--num_samples", "2", "--max_new_tokens", "8",
                                              "--device", "cpu"],
                                monkeypatch, capsys)
    assert code == 0, err
    assert out.count("--- prompt 1, sample") == 2
    # the chat: a message with characters the world never uses is refused with the message, and the
    # chat goes on
    code, out, err = run_script("sample.py", ["--init_from", str(world_ckpt), "--chat", "true",
                                              "--max_new_tokens", "6", "--device",
                                              "cpu"], monkeypatch, capsys,
                                stdin="Où est Zürich?\nWhat is the capital of Faru?\n/quit\n")
    assert code == 0, err
    refused = [line for line in out.splitlines() if "characters the world never uses" in line]
    assert len(refused) == 1 and "'ù' 'ü'" in refused[0], out
    assert out.count("\nAssistant:") == 1  # the second message was answered
    # a prompt outside the vocabulary: one line, no traceback
    code, out, err = run_script("sample.py", ["--init_from", str(world_ckpt), "--prompt", "Où?",
                                              "--max_new_tokens", "8", "--device", "cpu"],
                                monkeypatch, capsys)
    assert code != 0 and "characters the world never uses" in err and "Traceback" not in err


def test_export_refuses_a_world_vocabulary_checkpoint_with_one_line(world_ckpt, tmp_path,
                                                                    monkeypatch, capsys):
    code, _, err = run_script("export.py",
                              ["--init_from", str(world_ckpt), "--out_dir", str(tmp_path / "hf")],
                              monkeypatch, capsys)
    assert code != 0 and "world's vocabulary" in err and "Traceback" not in err
    assert not (tmp_path / "hf" / "model.safetensors").exists()


def test_vocab_flag_needs_a_vocabulary_file_and_a_scratch_model(world, world_ckpt, tmp_path,
                                                                monkeypatch, capsys):
    bad = tmp_path / "vocab.json"
    bad.write_text(json.dumps({"ids": [5, 3]}))
    common = ["--n_layer", "1", "--n_head", "1", "--n_embd", "8", "--block_size", "32",
              "--data_dir", str(world), "--train_file", "corpus_train.jsonl", "--val_file",
              "corpus_val.jsonl", "--out_dir", str(tmp_path / "o"), "--max_prompt_tokens", "1",
              "--max_response_tokens", "8", "--max_new_tokens", "4", "--device", "cpu"]
    code, _, err = run_script("sft.py", ["--init_from", "scratch", "--vocab", str(bad), *common],
                              monkeypatch, capsys)
    assert code != 0 and "sorted distinct GPT-2 token ids" in err
    code, _, err = run_script("sft.py", ["--init_from", str(world_ckpt), "--vocab",
                                         str(world / "vocab.json"), *common], monkeypatch, capsys)
    assert code != 0 and "a checkpoint carries its own vocabulary" in err
