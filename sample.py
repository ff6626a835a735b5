"""
Generate completions from any checkpoint of the pipeline, compare checkpoints, score with a
reward model.

Examples:
    python sample.py --init_from out/sft/ckpt.pt \\
        --prompt "\\n\\nHuman: How do I bake bread?\\n\\nAssistant:"
    python sample.py --init_from gpt2 --prompt "The meaning of life is" --num_samples 3 --top_p 0.9
    # side by side, with rewards
    python sample.py --init_from out/sft/ckpt.pt,out/ppo/ckpt.pt --reward_ckpt out/reward/ckpt.pt \\
        --prompt_file data/hh_rlhf/prompts_val.jsonl --max_prompts 4
    # score a response only
    python sample.py --reward_ckpt out/reward/ckpt.pt --prompt "..." --response " Sure, ..."
    # talk to it (/reset, /quit, Ctrl-D), or to several side by side
    python sample.py --init_from out/ppo/ckpt.pt --chat
    python sample.py --init_from out/sft/ckpt.pt,out/ppo/ckpt.pt --chat \\
        --reward_ckpt out/reward/ckpt.pt

`--prompt` turns the two characters \\n into a newline, so HH-style prompts can be typed in a shell.
Several checkpoints (comma-separated) get the same prompts and the same seed, one after the other.
`--chat` holds a conversation in the HH dialogue format ("\\n\\nHuman: ...\\n\\nAssistant:"); with
several checkpoints each answers every message and keeps its own side of the conversation.
"""

import re
import sys
from dataclasses import dataclass
from typing import Optional

import torch

from lib.checkpoints import load_model
from lib.config import UsageError, run
from lib.data import prompt_problem, read_jsonl
from lib.responses import score_texts as rm_score_texts
from lib.tokens import EOS, decode_response, encode_prompt, get_tokenizer, pad_left
from lib.training import autocast, setup_device


@dataclass
class Config:
    init_from: str = "out/sft/ckpt.pt"  # checkpoint(s), comma-separated; or gpt2.. / a HF folder
    prompt: str = "\n\nHuman: Can you help me write a short poem about the sea?\n\nAssistant:"
    prompt_file: str = ""  # a prompt per line, or JSON lines of "prompt"s; overrides --prompt
    max_prompts: int = 4  # at most this many prompts from --prompt_file
    response: str = ""  # with --reward_ckpt: score this response to --prompt instead of generating
    reward_ckpt: str = ""  # reward model (out/reward/ckpt.pt) that scores every completion
    chat: bool = False  # talk to the model(s): an HH dialogue from stdin (/reset, /quit, Ctrl-D)
    num_samples: int = 1  # completions per prompt
    max_new_tokens: int = 64
    temperature: float = 0.8  # 0 = greedy
    top_k: Optional[int] = None  # keep only the k most likely tokens
    top_p: Optional[float] = None  # nucleus sampling: keep the most likely tokens up to this mass
    seed: int = 1337
    strict: bool = False  # refuse a file with a malformed line (default: skip it, naming file:line)
    device: str = "auto"  # auto = cuda if available, else cpu
    dtype: str = "auto"  # autocast: auto = bfloat16 on CUDA, float32 on CPU; or bfloat16, float32

    # checked where the flags are parsed
    PATHS = {"init_from": "model", "prompt_file": "file", "reward_ckpt": "model"}


CONFIGS = {"greedy": dict(temperature=0.0), "creative": dict(temperature=1.0, top_p=0.95)}


def read_prompts(cfg):
    if not cfg.prompt_file:
        if not cfg.prompt:
            sys.exit("error: --prompt is empty: give the text to continue (or --prompt_file)")
        return [cfg.prompt.replace("\\n", "\n")]
    if cfg.prompt_file.endswith((".jsonl", ".json")):
        rows = read_jsonl(cfg.prompt_file, "prompts", {"prompt": str}, check=prompt_problem,
                          strict=cfg.strict, hint="")
        return [row["prompt"] for row in rows][:cfg.max_prompts]
    with open(cfg.prompt_file, encoding="utf-8", errors="replace") as f:
        lines = [line.rstrip("\n") for line in f if line.strip()]
    if not lines:
        sys.exit(f"error: --prompt_file {cfg.prompt_file} holds no prompts (one per line, or JSON "
                 f"lines with a \"prompt\" field)")
    return lines[:cfg.max_prompts]


def score_texts(reward_model, rm_config, enc, prompts, responses, device=None, dtype="auto"):
    """Reward-model scores of prompt + response (+ EOS), read at the EOS token (InstructGPT 3.5),
    with the token budgets the reward model was trained with."""
    device = device or next(reward_model.parameters()).device
    return rm_score_texts(reward_model, rm_config, enc, prompts, responses, autocast(device, dtype))


def chat_prompt(enc, turns, message, budget):
    """Tokens of the conversation `turns` [(human, assistant reply)] + the new human `message` in
    the HH format, ending with "\\n\\nAssistant:", within `budget` tokens: the oldest turns are
    dropped until it fits (a message too long on its own keeps its end).
    Returns (tokens, number of turns dropped)."""
    tail = f"\n\nHuman: {message}\n\nAssistant:"
    for dropped in range(len(turns) + 1):
        history = "".join(f"\n\nHuman: {h}\n\nAssistant:{a}" for h, a in turns[dropped:])
        ids = enc.encode_ordinary(history + tail)
        if len(ids) <= budget:
            return ids, dropped
    return encode_prompt(enc, tail, budget), len(turns)


def chat_answer(model, enc, turns, message, cfg, generator, device):
    """The model's next assistant turn after `turns` + `message`, sampled up to EOS and cut where it
    starts to write the next turn itself. `turns` is updated in place (oldest turns dropped to fit,
    the new turn added). Returns (reply, prompt tokens, number of turns dropped)."""
    ids, dropped = chat_prompt(enc, turns, message, model.config.block_size - cfg.max_new_tokens)
    del turns[:dropped]  # gone for good: later prompts stay a suffix of the same conversation
    with autocast(device, cfg.dtype):
        out = model.generate(torch.tensor([ids], device=device), cfg.max_new_tokens,
                             temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
                             eos_token_id=EOS, generator=generator)
    text = decode_response(enc, out[0, len(ids):].tolist())
    reply = re.split(r"\n\n(?:Human|Assistant):", text)[0].rstrip()
    turns.append((message, reply))
    return reply, ids, dropped


@torch.no_grad()
def chat(cfg, reward_model, rm_config, device):
    """Talk to one or several models; each keeps its own side of the conversation within its
    block_size, in its own vocabulary (a message with characters a world's model never saw is
    refused, and the chat goes on)."""
    models, encs = {}, {}
    for init_from in [p.strip() for p in cfg.init_from.split(",") if p.strip()]:
        model, _ = load_model(init_from, kind="gpt", device=device)
        if model.config.block_size <= cfg.max_new_tokens:
            sys.exit(f"error: max_new_tokens {cfg.max_new_tokens} leaves no room for a "
                     f"conversation in block_size {model.config.block_size}")
        models[init_from], encs[init_from] = model.eval(), get_tokenizer(model.config.vocab)
    rm_enc = get_tokenizer(reward_model.config.vocab) if reward_model is not None else None
    generators = {name: torch.Generator(device=device).manual_seed(cfg.seed) for name in models}
    turns = {name: [] for name in models}
    noticed = False
    try:
        print(f"chat with {' and '.join(models)}: type a message; /reset starts over, /quit or "
              f"Ctrl-D ends", flush=True)
        while True:
            message = input("\nHuman: ").strip()
            # scripted input is not echoed: show it, so the transcript reads right
            if not sys.stdin.isatty():
                print(message)
            if message == "/quit":
                break
            if message == "/reset":
                turns = {name: [] for name in models}
                print("(conversation reset)")
                continue
            for name, model in models.items() if message else ():
                try:
                    reply, ids, dropped = chat_answer(model, encs[name], turns[name], message, cfg,
                                                      generators[name], device)
                # characters outside a world's vocabulary: say so, wait for the next message
                except UsageError as e:
                    print(f"({e})")
                    continue
                if dropped and not noticed:
                    print(f"(the conversation no longer fits the model's context of "
                          f"{model.config.block_size} tokens: the oldest turns are dropped from "
                          f"now on)")
                    noticed = True
                label = "Assistant" if len(models) == 1 else f"Assistant [{name}]"
                reward = ""
                if reward_model is not None:
                    prompt = encs[name].decode(ids)
                    score = score_texts(reward_model, rm_config, rm_enc, [prompt], [reply])[0]
                    reward = f"   (reward {score:.3f})"
                print(f"{label}:{reply if reply.strip() else ' (empty reply)'}{reward}", flush=True)
    except (EOFError, KeyboardInterrupt):  # Ctrl-D / Ctrl-C: end the chat, not with a traceback
        print()


@torch.no_grad()
def main(cfg):
    device = setup_device(cfg.device, cfg.seed)
    prompts = read_prompts(cfg)
    reward_model, rm_config, rm_enc = None, {}, None
    if cfg.reward_ckpt:
        reward_model, rm_ckpt = load_model(cfg.reward_ckpt, kind="scalar", device=device)
        reward_model.eval()
        rm_config = rm_ckpt["config"] if rm_ckpt else {}
        rm_enc = get_tokenizer(reward_model.config.vocab)  # a model encodes in its own vocabulary
    if cfg.response:
        if reward_model is None:
            sys.exit("error: --response needs --reward_ckpt (the reward model that scores it)")
        score = score_texts(reward_model, rm_config, rm_enc, prompts[:1], [cfg.response])[0]
        print(f"reward {score:.4f}")
        return
    if cfg.chat:
        return chat(cfg, reward_model, rm_config, device)
    for init_from in [p.strip() for p in cfg.init_from.split(",") if p.strip()]:
        model, _ = load_model(init_from, kind="gpt", device=device)
        model.eval()
        enc = get_tokenizer(model.config.vocab)  # GPT-2's, or a lab model's world's (config.vocab)
        budget = model.config.block_size - cfg.max_new_tokens
        if budget <= 0:
            sys.exit(f"error: max_new_tokens {cfg.max_new_tokens} leaves no room for a prompt in "
                     f"block_size {model.config.block_size}")
        queries = []
        for i, p in enumerate(prompts):
            n = len(enc.encode_ordinary(p))
            if n > budget and not cfg.prompt_file:
                sys.exit(f"error: prompt of {n} tokens + max_new_tokens {cfg.max_new_tokens} "
                         f"exceeds the model's block_size {model.config.block_size}: shorten the "
                         f"prompt or lower max_new_tokens")
            if n > budget:  # prompts from a file keep their end (the latest turns), as in training
                print(f"note: prompt {i + 1} ({n} tokens) cut to its last {budget} tokens to "
                      f"fit block_size")
            queries += [encode_prompt(enc, p, budget)] * cfg.num_samples
        idx, mask = pad_left(queries)  # (N, T)
        gen = torch.Generator(device=device).manual_seed(cfg.seed)  # the same for every checkpoint
        with autocast(device, cfg.dtype):
            out = model.generate(idx.to(device), cfg.max_new_tokens, temperature=cfg.temperature,
                                 top_k=cfg.top_k, top_p=cfg.top_p, eos_token_id=EOS,
                                 attention_mask=mask.to(device), generator=gen)
        responses = [decode_response(enc, row) for row in out[:, idx.size(1):].tolist()]
        texts = [p for p in prompts for _ in range(cfg.num_samples)]
        scores = None
        if reward_model is not None:
            scores = score_texts(reward_model, rm_config, rm_enc, texts, responses)
        print(f"==================== {init_from}")
        for i, (p, r) in enumerate(zip(texts, responses)):
            head = f"--- prompt {i // cfg.num_samples + 1}, sample {i % cfg.num_samples + 1}"
            print(head + (f" | reward {scores[i]:.3f}" if scores else ""))
            print(f"{p}\033[1m{r}\033[0m" if sys.stdout.isatty() else p + r)
        if scores:
            print(f"mean reward {sum(scores) / len(scores):.4f} over {len(scores)} samples")


if __name__ == "__main__":
    run(main, Config, CONFIGS)
