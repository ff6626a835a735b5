"""
What every stage shares, and nothing else: command-line config parsing, the model-size presets,
device/precision setup, checkpoints (save/load, building a model from any source), the tokenizer and
prompt/response batching, metric logging with progress lines, and plots. The math of each stage stays
in its own file.
"""

import argparse
import contextlib
import dataclasses
import functools
import inspect
import json
import math
import os
import re
import sys
import time
import typing

import torch

from model import GPT, GPTConfig, ScalarGPT, load_hf_gpt2

EOS = 50256  # <|endoftext|>: end of sequence, and the padding id (GPT-2 has no separate pad token)

# Model-size part of the presets, defined once for every script. `tiny` trains from scratch on a CPU;
# the others are OpenAI's GPT-2 sizes (124M, 355M, 774M, 1.5B) loaded from pretrained weights.
MODEL_PRESETS = {
    "tiny": dict(n_layer=4, n_head=4, n_embd=256, block_size=512),
    "small": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024),
    "medium": dict(n_layer=24, n_head=16, n_embd=1024, block_size=1024),
    "large": dict(n_layer=36, n_head=20, n_embd=1280, block_size=1024),
    "xl": dict(n_layer=48, n_head=25, n_embd=1600, block_size=1024),
}
GPT2_NAMES = {"tiny": "scratch", "small": "gpt2", "medium": "gpt2-medium", "large": "gpt2-large", "xl": "gpt2-xl"}

# The range of every numeric (and choice) config field, by name, for all scripts: parse_config refuses a value
# outside it with one message. A stage's Config may override a rule with a class attribute
# `RANGES = {field: rule}`. A rule is a bound (">= 1", "> 0"), an interval ("(0, 1]": round bracket = open
# end), or a tuple of allowed values. Non-finite numbers (nan, inf) are never in range.
FIELD_RANGES = {
    # model shape
    **dict.fromkeys(("n_layer", "n_head", "n_embd", "block_size"), ">= 1"),
    "dropout": "[0, 1)",
    # counts: tokens, batches, steps, intervals
    **dict.fromkeys(("max_prompt_tokens", "max_response_tokens", "max_new_tokens", "max_prompts", "num_samples",
                     "batch_size", "micro_batch_size", "minibatch_size", "grad_accum", "gradient_accumulation_steps",
                     "max_steps", "epochs", "iters", "noptepochs", "ptx_batch_size", "eval_interval", "log_interval",
                     "sample_every", "eval_examples", "eval_prompts", "kl_horizon"), ">= 1"),
    **dict.fromkeys(("num_eval_samples", "n_samples", "warmup_steps", "warmup_iters", "seed"), ">= 0"),
    "ptx_max_tokens": ">= 2",  # an input token and the token it predicts
    # optimizer
    "lr": "> 0", "min_lr": ">= 0", "min_lr_frac": "[0, 1]", "weight_decay": ">= 0", "beta1": "[0, 1)",
    "beta2": "[0, 1)", "adam_eps": "> 0", "grad_clip": ">= 0",
    # sampling
    "temperature": ">= 0", "top_k": ">= 1", "top_p": "(0, 1]",
    # rlhf
    "cliprange": "> 0", "cliprange_value": "> 0", "vf_coef": ">= 0", "gamma": "[0, 1]", "lam": "[0, 1]",
    "kl_coef": ">= 0", "kl_target": "> 0", "ptx_coef": ">= 0", "missing_eos_penalty": ">= 0",
    # system
    "dtype": ("bfloat16", "float32"),
}


# ----------------------------------------------------------------------------------------------
# Configuration: defaults < preset < command-line flags

def _field_type(cls, f):
    """The Python type a flag parses to: the dataclass annotation, unwrapping Optional[X]."""
    t = typing.get_type_hints(cls)[f.name]
    args = [a for a in typing.get_args(t) if a is not type(None)]
    return args[0] if typing.get_origin(t) is typing.Union and len(args) == 1 else t


def _parse_bool(s):
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got '{s}'")


def _parse_optional(t):
    def parse(s):
        return None if s.lower() == "none" else t(s)
    parse.__name__ = t.__name__  # argparse names the type in its error messages
    return parse


@functools.lru_cache(maxsize=None)
def _field_comments(config_cls):
    """{field: its trailing comment} from the dataclass source, so --help shows each field's meaning."""
    try:
        source = inspect.getsource(config_cls)
    except (OSError, TypeError):
        return {}
    return {m.group(1): m.group(2).strip() for m in re.finditer(r"^\s+(\w+):[^#\n]*#(.*)$", source, re.M)}


def parse_config(config_cls, presets, argv=None):
    """Build a `config_cls` from `--config NAME` (a key of `presets`) and `--field value` overrides."""
    fields = dataclasses.fields(config_cls)
    names = ", ".join(f"--{f.name}" for f in fields)
    parser = argparse.ArgumentParser(
        description=sys.modules["__main__"].__doc__ if argv is None else None,
        formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    parser.error = lambda msg: (parser.print_usage(sys.stderr),
                                sys.exit(f"error: {msg}\nvalid options: --config, {names}"))
    parser.add_argument("--config", choices=sorted(presets), help="named preset (applied before the flags)")
    defaults = config_cls()
    docs = _field_comments(config_cls)
    for f in fields:
        t = _field_type(config_cls, f)
        parse = _parse_bool if t is bool else _parse_optional(t) if getattr(defaults, f.name) is None else t
        doc = f"{docs.get(f.name, '')} (default: {getattr(defaults, f.name)!r})".lstrip()
        flag = dict(nargs="?", const=True) if t is bool else {}  # a bare --chat means --chat true
        parser.add_argument(f"--{f.name}", type=parse, default=None, metavar=t.__name__.upper(),
                            help=doc.replace("%", "%%"), **flag)  # argparse %-formats help strings
    args = parser.parse_args(argv)
    values = dict(presets[args.config]) if args.config else {}
    unknown = set(values) - {f.name for f in fields}
    assert not unknown, f"preset {args.config} sets unknown fields {unknown}"
    values.update({k: v for k, v in vars(args).items() if k != "config" and v is not None})
    if args.config:
        values["preset"] = args.config  # recorded for the run; ignored if the Config has no such field
    values = {k: v for k, v in values.items() if k in {f.name for f in fields}}
    cfg = config_cls(**values)
    check_ranges(cfg)
    return cfg


def in_range(value, rule):
    """Whether `value` satisfies a FIELD_RANGES rule: ">= 1", "> 0", "(0, 1]", or a tuple of choices."""
    if isinstance(rule, tuple):
        return value in rule
    if not math.isfinite(value):
        return False
    if rule[0] in "([":
        lo, hi = (float(b) for b in rule[1:-1].split(","))
        return (lo < value if rule[0] == "(" else lo <= value) and (value < hi if rule[-1] == ")" else value <= hi)
    op, bound = rule.split()
    return value > float(bound) if op == ">" else value >= float(bound)


def check_ranges(cfg):
    """Exit with one message naming the first field of `cfg` outside its range (FIELD_RANGES, then the
    Config's own RANGES). None (an optional field left unset) is always allowed."""
    rules = {**FIELD_RANGES, **getattr(cfg, "RANGES", {})}
    for f in dataclasses.fields(cfg):
        value, rule = getattr(cfg, f.name), rules.get(f.name)
        if rule is None or value is None or isinstance(value, bool):
            continue
        if isinstance(rule, str) and not isinstance(value, (int, float)):
            continue
        if not in_range(value, rule):
            want = f"one of {', '.join(rule)}" if isinstance(rule, tuple) else f"in {rule}" if rule[0] in "([" else rule
            meaning = _field_comments(type(cfg)).get(f.name)
            sys.exit(f"error: --{f.name} {value} is out of range: it must be {want}"
                     + (f" ({f.name}: {meaning})" if meaning else ""))


def run(train, config_cls, presets):
    """A stage's command-line entry: parse the flags, then train(). A failed check of the settings (an
    assert with a message, e.g. token budgets that do not fit block_size) ends with its message alone, and so
    does a diverged run (a FloatingPointError from check_finite or GPT.generate)."""
    cfg = parse_config(config_cls, presets)
    try:
        return train(cfg)
    except AssertionError as e:
        if not str(e):
            raise  # an assert without a message is a bug, keep its traceback
        sys.exit(f"error: {e}")
    except FloatingPointError as e:  # check_finite: training diverged; or NaN/inf logits in GPT.generate
        sys.exit(f"error: {e}")


def print_config(cfg, out_dir=None):
    """Print the resolved config and save it as out_dir/config.json."""
    d = dataclasses.asdict(cfg)
    print("config: " + " ".join(f"{k}={v}" for k, v in d.items()))
    if out_dir:
        atomic_write_text(os.path.join(out_dir, "config.json"), json.dumps(d, indent=2) + "\n")


# ----------------------------------------------------------------------------------------------
# Device and precision: the few GPU paths, each of which also runs on CPU

def setup_device(device="auto", seed=1337):
    torch.manual_seed(seed)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return torch.device(device)


def rng_state():
    """The global random state (CPU, and every CUDA device), saved in checkpoints so that a resumed run draws
    the same dropout masks as an uninterrupted one."""
    return {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state):
    torch.set_rng_state(state["cpu"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def autocast(device, dtype="bfloat16"):
    """bf16 autocast on CUDA when asked for; float32 (a no-op context) everywhere else."""
    if device.type == "cuda" and dtype == "bfloat16":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def maybe_compile(model, enabled):
    return torch.compile(model) if enabled else model


def make_adamw(params, lr, weight_decay, betas, device, eps=1e-8):
    """AdamW with weight decay on matrices (embeddings, Linear weights) only, never on biases and LayerNorm
    gains. fused=True: one kernel for all parameters, ~5x faster than the default loop on CPU as well."""
    params = [p for p in params if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=device.type in ("cpu", "cuda"))


def lr_at(step, lr, min_lr, warmup_steps, total_steps):
    """Learning rate of optimizer step `step` (0-based): linear warmup to lr, then cosine decay to min_lr."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
    return min_lr + 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))) * (lr - min_lr)


def check_finite(x, step, what="loss"):
    """Stop the run if `x` (a number or a tensor) holds NaN or inf: training diverged at `step`. Every stage
    calls it on each step's loss before the optimizer step, so non-finite gradients are never applied, and
    save_checkpoint calls it on the weights, so a checkpoint with NaN weights is never written."""
    finite = math.isfinite(x) if isinstance(x, (int, float)) else bool(torch.isfinite(x).all())
    if not finite:
        raise FloatingPointError(
            f"{what} is NaN or inf at step {step}: training diverged. Likely cause: a learning rate too high for "
            f"this model (lower --lr) or unclipped gradients (--grad_clip 1.0). Nothing was saved from this step "
            f"on; the last checkpoint written before it is unchanged.")


def decode_response(enc, tokens):
    """Text of a generated response: the tokens before the first EOS (after it comes only padding)."""
    return enc.decode(tokens[:tokens.index(EOS)] if EOS in tokens else tokens)


# ----------------------------------------------------------------------------------------------
# Checkpoints: one file holding model kind + config, weights, and the run's config

def fsync_replace(tmp, path):
    """Rename the finished file `tmp` to `path`, durably: its data is flushed to disk (fsync) before the rename
    and the directory entry after it, so a power loss leaves the old file or the complete new one under
    `path`, never an empty one. Every atomic writer (checkpoints, config, plots, prepared data) ends here."""
    fd = os.open(tmp, os.O_RDWR)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    try:
        fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    except OSError:  # a directory cannot be opened on Windows; its rename is durable there already
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path, text):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    fsync_replace(tmp, path)


def save_checkpoint(path, model, cfg, **extra):
    """Write atomically (temp file + fsync + rename): a crash mid-write never destroys the previous checkpoint,
    and weights holding NaN or inf (a diverged run) are never written."""
    model = getattr(model, "_orig_mod", model)  # unwrap torch.compile
    step = extra.get("step", extra.get("iteration", "?"))
    for name, state in (("model", model.state_dict()), ("critic", extra.get("critic") or {})):
        for t in state.values():
            if t.is_floating_point():
                check_finite(t, step, f"a {name} weight to be saved in {path}")
    ckpt = {"kind": "scalar" if isinstance(model, ScalarGPT) else "gpt",
            "model_config": dataclasses.asdict(model.config),
            "model": model.state_dict(),
            "config": dataclasses.asdict(cfg), **extra}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    torch.save(ckpt, tmp)
    fsync_replace(tmp, path)
    return path


def load_checkpoint(path, device="cpu"):
    if not os.path.isfile(path):
        sys.exit(f"error: checkpoint {path} not found. Train the stage that writes it first "
                 f"(e.g. python sft.py --config tiny) or pass the right path.")
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        sys.exit(f"error: could not read checkpoint {path} ({type(e).__name__}: {e}). "
                 f"It may be truncated or not a checkpoint of this project.")


KINDS = {"gpt": "a language model (written by sft.py or ppo.py)", "scalar": "a reward model (written by reward.py)"}
WANTED = {"gpt": "pass an SFT or PPO checkpoint (e.g. out/sft/ckpt.pt), a GPT-2 name, or scratch",
          "scalar": "pass the checkpoint reward.py wrote (e.g. out/reward/ckpt.pt), or scratch for a demo run"}


def load_model(init_from, kind="gpt", model_cfg=None, dropout=0.0, device="cpu", transplant=False, seed=None):
    """Build a GPT (kind="gpt") or ScalarGPT (kind="scalar") from any source.

    init_from: "scratch" (fresh weights of shape `model_cfg`), a GPT-2 name (gpt2, gpt2-medium, ...),
    a folder in Hugging Face format (GPT-2's, or one written by export.py), or a checkpoint file of this project.
    transplant: where a stage initialises a new model from another kind (reward.py's reward model from the
    SFT model, a critic), a source of the other kind gives its trunk and the head stays fresh (InstructGPT
    3.5). Without it the source must be a trained model of `kind`: a language model for a policy, and for
    kind="scalar" a normalised reward model written by reward.py; anything else is an error.
    seed: draw scratch weights from torch.manual_seed(seed), leaving the global random state as it was, so
    the same model comes out whatever ran before (e.g. a resumed run that loaded other checkpoints first).
    Returns (model, checkpoint dict or None); for an exported folder the dict holds its "kind", the run's
    "config" (and a reward model's "reward_shift").
    """
    cls = ScalarGPT if kind == "scalar" else GPT
    ckpt = None
    if init_from == "scratch":
        with torch.random.fork_rng(devices=[], enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)
            model = cls(GPTConfig(**{**(model_cfg or {}), "dropout": dropout}))
    elif init_from in GPT2_SIZES or os.path.isdir(init_from):
        folder = init_from if os.path.isdir(init_from) else fetch_gpt2(init_from)
        try:
            config, state_dict, hf = load_hf_gpt2(folder, dropout)
        except Exception as e:  # a missing or unreadable config.json / model.safetensors
            sys.exit(f"error: could not load GPT-2 weights from {folder} ({type(e).__name__}: {e}). --init_from "
                     f"takes a folder holding config.json and model.safetensors in the Hugging Face GPT-2 format.")
        ckpt = hf.get("instructgpt")  # written by export.py: model kind and the run's config
        if ckpt is None and kind != "gpt" and not transplant:
            sys.exit(f"error: {init_from} is a pretrained GPT-2 language model, but {KINDS[kind]} is expected "
                     f"here; {WANTED[kind]}")
        if ckpt is not None:
            _check_kind(init_from, ckpt, kind, transplant)
        if (ckpt or {"kind": "gpt"})["kind"] == kind:
            model = cls(config)
            if cls is GPT:
                state_dict["lm_head.weight"] = state_dict["transformer.wte.weight"]  # tied
            load_state(model, state_dict, folder)
        else:
            model = _transplant(state_dict, config, cls)
    else:
        if not init_from.endswith(".pt") and not os.path.exists(init_from):
            sys.exit(f"error: init_from '{init_from}' is neither 'scratch', a GPT-2 name ({', '.join(GPT2_SIZES)}), "
                     f"a Hugging Face folder, nor an existing checkpoint file")
        ckpt = load_checkpoint(init_from)
        _check_kind(init_from, ckpt, kind, transplant)
        config = GPTConfig(**{**ckpt["model_config"], "dropout": dropout})
        if ckpt["kind"] == kind:
            model = cls(config)
            load_state(model, ckpt["model"], init_from)
        else:
            model = _transplant(ckpt["model"], config, cls)
    if model_cfg:
        mismatch = {k: (v, getattr(model.config, k)) for k, v in model_cfg.items()
                    if k in ("n_layer", "n_head", "n_embd") and getattr(model.config, k) != v}
        if mismatch and init_from != "scratch":
            print(f"note: model shape comes from {init_from}: "
                  + ", ".join(f"{k}={b} (config said {a})" for k, (a, b) in mismatch.items()))
    return model.to(device), ckpt


def _check_kind(init_from, ckpt, kind, transplant):
    """A trained model of `kind` must come from a source of that kind, unless a stage transplants (load_model)."""
    if ckpt["kind"] != kind and not transplant:
        sys.exit(f"error: {init_from} holds {KINDS[ckpt['kind']]}, but {KINDS[kind]} is expected here; "
                 f"{WANTED[kind]}")
    if kind == "scalar" and not transplant and "reward_shift" not in ckpt:
        sys.exit(f"error: {init_from} holds a scalar model without reward.py's normalisation (reward_shift), "
                 f"but a trained, normalised reward model is expected here; {WANTED[kind]}")


def load_state(model, state_dict, source):
    """load_state_dict with one clear message when the weights are of another shape or kind."""
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as e:
        first = str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else str(e)
        sys.exit(f"error: the weights in {source} do not fit this model ({first}). The checkpoint was written "
                 f"for another model shape or kind; pass a matching checkpoint or matching size flags.")


def _transplant(state_dict, config, cls):
    """Copy the shared transformer trunk into a model of another kind (its head stays as initialised)."""
    model = cls(config)
    trunk = {k: v for k, v in state_dict.items() if k.startswith("transformer.")}
    missing, unexpected = model.load_state_dict(trunk, strict=False)
    assert not unexpected and all(not k.startswith("transformer.") for k in missing), (missing, unexpected)
    return model


# ----------------------------------------------------------------------------------------------
# GPT-2 weights from the Hugging Face hub, through its own client: a copy already in the Hugging Face
# cache (e.g. from transformers) is used as is, and HF_ENDPOINT, HF_TOKEN, HF_HUB_CACHE, HF_HUB_OFFLINE work

GPT2_SIZES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")


def fetch_gpt2(name):
    """The local folder (in the Hugging Face cache) holding config.json + model.safetensors of GPT-2 `name`;
    downloaded once, with the hub's progress bars. Offline without a cached copy: one message saying what to do."""
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError
    files = ("config.json", "model.safetensors")
    # transformers users have GPT-2 cached as "gpt2" or, in newer examples, "openai-community/gpt2": the
    # first is fetched if needed, the second only looked up in the cache
    for repo in (name, f"openai-community/{name}"):
        try:
            paths = [hf_hub_download(repo, f, local_files_only=repo != name) for f in files]
            return os.path.dirname(paths[0])  # the snapshot folder of this revision holds both files
        except LocalEntryNotFoundError:
            continue
        except Exception as e:  # repository or network errors of the hub client
            sys.exit(f"error: could not download GPT-2 weights '{name}' from the Hugging Face hub "
                     f"({type(e).__name__}: {e}). A local folder holding {' and '.join(files)} also works as --init_from.")
    offline = " (HF_HUB_OFFLINE is set)" if constants.HF_HUB_OFFLINE else ""
    sys.exit(f"error: GPT-2 weights '{name}' are not in the Hugging Face cache ({constants.HF_HUB_CACHE}) "
             f"and could not be downloaded{offline}. Either connect once to the internet (or a mirror set in "
             f"HF_ENDPOINT) and run `hf download {name} {' '.join(files)}`, or copy those two files from "
             f"https://huggingface.co/openai-community/{name} into a folder and pass --init_from FOLDER.")


# ----------------------------------------------------------------------------------------------
# Tokenizer and batching of (prompt, response) text

def get_tokenizer():
    """GPT-2's BPE through tiktoken ("r50k_base" is the same tokenizer as "gpt2")."""
    import tiktoken
    try:
        return tiktoken.get_encoding("r50k_base")
    except Exception as e:
        sys.exit(f"error: could not load the GPT-2 tokenizer ({type(e).__name__}: {e}). tiktoken downloads it "
                 f"once; offline, point TIKTOKEN_CACHE_DIR at a folder holding it (e.g. ../shared/tiktoken).")


def encode_prompt(enc, text, max_tokens):
    """Tokens of a prompt; a long prompt keeps its end (the latest turns, which the response answers)."""
    ids = enc.encode_ordinary(text)
    return ids[-max_tokens:] if len(ids) > max_tokens else ids


def encode_response(enc, text, max_tokens, eos=True):
    """Tokens of a response followed by EOS; a response cut to `max_tokens` carries no EOS."""
    ids = enc.encode_ordinary(text)
    if len(ids) >= max_tokens + (0 if eos else 1):
        return ids[:max_tokens]
    return ids + [EOS] if eos else ids


def pad(seqs, side, pad_id=EOS):
    """List of token lists -> (ids, attention_mask), both LongTensor (B, T_max), padded on `side`."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        cols = slice(T - len(s), T) if side == "left" else slice(0, len(s))
        ids[i, cols] = torch.tensor(s, dtype=torch.long)
        mask[i, cols] = 1
    return ids, mask


def pad_left(seqs, pad_id=EOS):
    """Prompts for generation: left padding, so every row's next token goes in the same column."""
    return pad(seqs, "left", pad_id)


def pad_right(seqs, pad_id=EOS):
    """Training sequences: right padding, which causal attention never sees from a real token."""
    return pad(seqs, "right", pad_id)


def read_jsonl(path, what="data"):
    if not os.path.isfile(path):
        sys.exit(f"error: {what} file {path} not found. Prepare the data first: "
                 f"python data/hh_rlhf/prepare.py (offline: --source ../shared/data/hh-rlhf --subsets harmless-base)")
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


# ----------------------------------------------------------------------------------------------
# Metrics: a progress line with ETA, metrics.jsonl, plots

def format_time(seconds):
    seconds = int(max(seconds, 0))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class MetricsLog:
    """Appends one JSON dict per call to out_dir/metrics.jsonl and prints one progress line. With `log_to`
    ("wandb", "tensorboard" or both, comma-separated) the same numbers go there too, under the same names.

    resume_step: None starts a fresh file; a step number (that of the checkpoint a run resumes from) keeps
    the rows up to it and drops later ones, logged by the interrupted run after its last checkpoint and
    about to be logged again, so the file (and its plot) stays one curve with one row per step."""

    def __init__(self, out_dir, total_steps, resume_step=None, log_to="", run_config=None):
        self.path = os.path.join(out_dir, "metrics.jsonl")
        os.makedirs(out_dir, exist_ok=True)
        if resume_step is None and os.path.exists(self.path):
            os.remove(self.path)
        elif resume_step is not None and os.path.exists(self.path):
            kept = [r for r in read_metrics(self.path) if r["step"] <= resume_step]
            atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        self.total, self.t0, self.step0 = total_steps, time.time(), None
        self.trackers = [open_tracker(name.strip(), out_dir, run_config) for name in log_to.split(",") if name.strip()]

    def log(self, step, metrics, keys=None):
        """Log `metrics` for `step` (1-based); print `keys` (default: all) with the ETA."""
        if self.step0 is None:  # the clock starts at the first logged step; ETA from the steps since
            self.step0, self.t0 = step, time.time()
        done = step - self.step0
        eta = format_time((time.time() - self.t0) / done * (self.total - step)) if done > 0 else "?"
        row = {"step": step, **{k: (float(v) if isinstance(v, (int, float)) else v) for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        for tracker in self.trackers:
            tracker(step, {k: v for k, v in row.items() if k != "step" and isinstance(v, float)})
        shown = " | ".join(f"{k} {_fmt(metrics[k])}" for k in (keys or metrics) if k in metrics)
        print(f"step {step}/{self.total} | {shown} | eta {eta}", flush=True)


def open_tracker(name, out_dir, run_config):
    """A function (step, {name: number}) logging to Weights & Biases or TensorBoard, imported only when asked."""
    config = dataclasses.asdict(run_config) if dataclasses.is_dataclass(run_config) else (run_config or {})
    if name == "wandb":
        try:
            import wandb
        except ImportError:
            sys.exit("error: --log_to wandb needs the wandb package: pip install wandb (then wandb login, or "
                     "WANDB_MODE=offline)")
        run = wandb.init(project=os.environ.get("WANDB_PROJECT", "instructgpt"), dir=out_dir, config=config,
                         name=f"{os.path.basename(os.path.abspath(out_dir))}-{time.strftime('%Y%m%d-%H%M%S')}")
        return lambda step, values: run.log(values, step=step)
    if name == "tensorboard":
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            sys.exit("error: --log_to tensorboard needs the tensorboard package: pip install tensorboard")
        writer = SummaryWriter(os.path.join(out_dir, "tensorboard"))
        writer.add_text("config", "    " + json.dumps(config, indent=2).replace("\n", "\n    "))

        def log(step, values):
            for k, v in values.items():
                writer.add_scalar(k, v, step)
            writer.flush()  # visible in TensorBoard right away, and nothing lost if the run is killed
        return log
    sys.exit(f"error: --log_to {name!r}: expected wandb, tensorboard, or both comma-separated (default: off)")


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.3e}"
    return str(v)


def read_metrics(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_metrics(metrics_path, png_path, panels, title=None):
    """One PNG with a panel per entry of `panels` ({panel title: [metric keys]}), x = step."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = read_metrics(metrics_path)
    n = len(panels)
    cols = min(n, 3)
    fig, axes = plt.subplots(math.ceil(n / cols), cols, figsize=(5 * cols, 3.4 * math.ceil(n / cols)),
                             squeeze=False)
    for ax, (name, keys) in zip(axes.flat, panels.items()):
        for k in keys:
            pts = [(r["step"], r[k]) for r in rows if isinstance(r.get(k), (int, float))]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, marker="o" if len(pts) < 30 else None, ms=3, label=k)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if len(keys) > 1:
            ax.legend(fontsize=8)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    tmp = png_path + ".tmp.png"
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    fsync_replace(tmp, png_path)
    return png_path
