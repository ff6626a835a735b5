"""
Export a checkpoint of this project as a Hugging Face GPT-2 folder, so the trained model leaves the
project in the ecosystem's format.

    python export.py --init_from out/ppo/ckpt.pt --out_dir out/ppo/hf  # policy (or out/sft/ckpt.pt)
    python export.py --init_from out/reward/ckpt.pt --out_dir out/reward/hf  # reward model

A policy folder holds config.json, model.safetensors, generation_config.json and the GPT-2
tokenizer (vocab.json, merges.txt, tokenizer_config.json, derived offline from tiktoken's ranks),
and loads with
    transformers.AutoModelForCausalLM.from_pretrained("out/ppo/hf")
    transformers.AutoTokenizer.from_pretrained("out/ppo/hf")
giving the same logits as the checkpoint. A reward model folder holds the trunk under GPT-2's names
(so transformers.GPT2Model loads it), its score head as `score_head.weight` / `score_head.bias`
(the bias already carries the normalisation of reward.py: demonstrations score 0 on average) and,
in config.json under "instructgpt", the model kind, the normalisation shift and the run's config.
This project reads either folder back: --init_from out/reward/hf, --reward_ckpt out/reward/hf.
"""

import json
import os
from dataclasses import dataclass

from safetensors.torch import save_file

from lib.checkpoints import atomic_write_text, load_checkpoint, load_lora_model, load_state
from lib.config import require, run
from lib.tokens import EOS, get_tokenizer
from model import GPT, GPTConfig, ScalarGPT, merged_state_dict


@dataclass
class Config:
    init_from: str = "out/ppo/ckpt.pt"  # checkpoint of this project (policy or reward model)
    out_dir: str = "out/ppo/hf"  # folder to write (created; files in it are replaced)

    PATHS = {"init_from": "checkpoint", "out_dir": "out_dir"}  # checked where the flags are parsed


CONFIGS = {}
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def hf_state_dict(model):
    """Our state dict -> Hugging Face GPT-2 names and layouts: its Conv1D weights are the transpose
    of our nn.Linear ones (the inverse of model.hf_gpt2_state_dict). lm_head, tied to wte, is left
    out."""
    sd = {}
    for name, t in model.state_dict().items():
        if name == "lm_head.weight":
            continue
        sd[name] = (t.t() if name.endswith(CONV1D) else t).detach().float().contiguous().cpu()
    return sd


def hf_config(config, kind, extra):
    """config.json of a GPT-2 (transformers.GPT2Config fields), this project's metadata under
    "instructgpt"."""
    require(config.bias, "Hugging Face GPT-2 has biases in every Linear and LayerNorm: cannot "
                         "export bias=False")
    return {"architectures": ["GPT2LMHeadModel" if kind == "gpt" else "GPT2Model"],
            "model_type": "gpt2", "vocab_size": config.vocab_size, "n_positions": config.block_size,
            "n_embd": config.n_embd, "n_layer": config.n_layer, "n_head": config.n_head,
            "n_inner": None,
            "activation_function": "gelu_new",  # the tanh approximation, as in model.MLP
            "resid_pdrop": config.dropout, "embd_pdrop": config.dropout,
            "attn_pdrop": config.dropout, "layer_norm_epsilon": 1e-5, "initializer_range": 0.02,
            "bos_token_id": EOS, "eos_token_id": EOS, "tie_word_embeddings": True,
            "torch_dtype": "float32", "instructgpt": {"kind": kind, **extra}}


def bytes_to_unicode():
    """GPT-2's map from the 256 byte values to printable characters (byte tokens as text)."""
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
    cs = bs[:]
    for b in range(256):
        # the other bytes (control characters, space, ...) go to chr(256), chr(257), ...
        if b not in bs:
            bs.append(b)
            cs.append(256 + len(cs) - 188)
    return dict(zip(bs, map(chr, cs)))


def bpe_parts(ranks, token, max_rank):
    """Byte-pair-encode `token` using only merges of rank < max_rank: for a token of rank r the
    result is the two tokens whose merge created it (BPE applies merges in rank order)."""
    parts = [bytes([b]) for b in token]
    while True:
        pairs = enumerate(zip(parts, parts[1:]))
        best = min(((ranks.get(a + b, max_rank), i) for i, (a, b) in pairs), default=None)
        if best is None or best[0] >= max_rank:
            return parts
        i = best[1]
        parts = parts[:i] + [parts[i] + parts[i + 1]] + parts[i + 2:]


def tokenizer_files(enc, block_size):
    """vocab.json, merges.txt and tokenizer_config.json of GPT-2's tokenizer, derived from
    tiktoken's ranks (r50k_base: token id = rank; every token above the 256 bytes is one
    merge of two earlier tokens)."""
    ranks = enc._mergeable_ranks  # {token bytes: id}; tiktoken has no public accessor for them
    byte_char = bytes_to_unicode()
    text = lambda token: "".join(byte_char[b] for b in token)
    vocab = {text(token): rank for token, rank in ranks.items()}
    vocab["<|endoftext|>"] = EOS
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) > 1:
            parts = bpe_parts(ranks, token, rank)
            if len(parts) != 2:  # never for GPT-2's own merges
                raise ValueError(f"token {token!r} is not a single merge of two earlier tokens")
            merges.append(f"{text(parts[0])} {text(parts[1])}")
    special = "<|endoftext|>"
    config = {"tokenizer_class": "GPT2Tokenizer", "model_max_length": block_size,
              "add_prefix_space": False, "bos_token": special, "eos_token": special,
              "unk_token": special, "pad_token": special}
    return {"vocab.json": json.dumps(vocab, ensure_ascii=False),
            "merges.txt": "#version: 0.2\n" + "\n".join(merges) + "\n",
            "tokenizer_config.json": json.dumps(config, indent=2) + "\n"}


def export(cfg):
    ckpt = load_checkpoint(cfg.init_from)  # read once: for a large model the file is gigabytes
    kind = ckpt["kind"]
    require(ckpt["model_config"].get("vocab") is None, f"{cfg.init_from} has a world's vocabulary "
            f"of {ckpt['model_config']['vocab_size']} GPT-2 tokens (the lab's), which no Hugging "
            f"Face tokenizer maps text to: export.py writes models with GPT-2's own 50257 tokens "
            f"only; use it with sample.py instead")
    model = (ScalarGPT if kind == "scalar" else GPT)(GPTConfig(**ckpt["model_config"]))
    # a LoRA checkpoint holds adapters only: rebuilt on its base, and exported with them merged
    # into the weights
    if ckpt.get("lora"):
        state = merged_state_dict(load_lora_model(ckpt, cfg.init_from))
    else:
        state = ckpt["model"]
    load_state(model, state, cfg.init_from)
    extra = {"config": ckpt["config"], "source": cfg.init_from}
    if "reward_shift" in ckpt:  # reward.py's normalisation, already folded into score_head.bias
        extra["reward_shift"] = ckpt["reward_shift"]
    os.makedirs(cfg.out_dir, exist_ok=True)
    tmp = os.path.join(cfg.out_dir, "model.safetensors.tmp")
    save_file(hf_state_dict(model), tmp, metadata={"format": "pt"})
    os.replace(tmp, os.path.join(cfg.out_dir, "model.safetensors"))
    files = {"config.json": json.dumps(hf_config(model.config, kind, extra), indent=2) + "\n"}
    if kind == "gpt":
        tokens = {"bos_token_id": EOS, "eos_token_id": EOS, "pad_token_id": EOS}
        files["generation_config.json"] = json.dumps(tokens, indent=2) + "\n"
    if model.config.vocab_size == EOS + 1:  # GPT-2's vocabulary: the tokenizer fits
        files.update(tokenizer_files(get_tokenizer(), model.config.block_size))
    else:
        print(f"note: a vocabulary of {model.config.vocab_size} tokens is not GPT-2's: no "
              f"tokenizer files written")
    for name, text in files.items():
        atomic_write_text(os.path.join(cfg.out_dir, name), text)
    n = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"exported {kind} model ({n:.1f}M parameters) from {cfg.init_from} to {cfg.out_dir}: "
          + ", ".join(["model.safetensors", *files]))
    return cfg.out_dir


if __name__ == "__main__":
    run(export, Config, CONFIGS)
