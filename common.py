"""
What every stage shares, and nothing else: command-line config parsing, the model-size presets,
device/precision setup, checkpoints (save/load, building a model from any source), the tokenizer and
prompt/response batching, metric logging with progress lines, and plots. The math of each stage stays
in its own file.
"""

import argparse
import contextlib
import dataclasses
import inspect
import json
import math
import os
import re
import sys
import time
import typing

import torch

from model import GPT, GPT2_SIZES, GPTConfig, ScalarGPT

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
        parser.add_argument(f"--{f.name}", type=parse, default=None, metavar=t.__name__.upper(),
                            help=doc.replace("%", "%%"))  # argparse %-formats help strings
    args = parser.parse_args(argv)
    values = dict(presets[args.config]) if args.config else {}
    unknown = set(values) - {f.name for f in fields}
    assert not unknown, f"preset {args.config} sets unknown fields {unknown}"
    values.update({k: v for k, v in vars(args).items() if k != "config" and v is not None})
    if args.config:
        values["preset"] = args.config  # recorded for the run; ignored if the Config has no such field
    values = {k: v for k, v in values.items() if k in {f.name for f in fields}}
    return config_cls(**values)


def run(train, config_cls, presets):
    """A stage's command-line entry: parse the flags, then train(). A failed check of the settings (an
    assert with a message, e.g. token budgets that do not fit block_size) ends with its message alone."""
    cfg = parse_config(config_cls, presets)
    try:
        return train(cfg)
    except AssertionError as e:
        if not str(e):
            raise  # an assert without a message is a bug, keep its traceback
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


def decode_response(enc, tokens):
    """Text of a generated response: the tokens before the first EOS (after it comes only padding)."""
    return enc.decode(tokens[:tokens.index(EOS)] if EOS in tokens else tokens)


# ----------------------------------------------------------------------------------------------
# Checkpoints: one file holding model kind + config, weights, and the run's config

def atomic_write_text(path, text):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def save_checkpoint(path, model, cfg, **extra):
    """Write atomically (temp file + rename): a crash mid-write never destroys the previous checkpoint."""
    model = getattr(model, "_orig_mod", model)  # unwrap torch.compile
    ckpt = {"kind": "scalar" if isinstance(model, ScalarGPT) else "gpt",
            "model_config": dataclasses.asdict(model.config),
            "model": model.state_dict(),
            "config": dataclasses.asdict(cfg), **extra}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    torch.save(ckpt, tmp)
    os.replace(tmp, path)
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


def load_model(init_from, kind="gpt", model_cfg=None, dropout=0.0, device="cpu"):
    """Build a GPT (kind="gpt") or ScalarGPT (kind="scalar") from any source.

    init_from: "scratch" (fresh weights of shape `model_cfg`), a GPT-2 name (gpt2, gpt2-medium, ...),
    a folder in Hugging Face format, or a checkpoint file of this project. A ScalarGPT built from a
    language-model source keeps its trunk and gets a fresh score head (InstructGPT 3.5).
    Returns (model, checkpoint dict or None).
    """
    cls = ScalarGPT if kind == "scalar" else GPT
    ckpt = None
    if init_from == "scratch":
        model = cls(GPTConfig(**{**(model_cfg or {}), "dropout": dropout}))
    elif init_from in GPT2_SIZES or os.path.isdir(init_from):
        try:
            lm = GPT.from_pretrained(init_from, dropout=dropout)
        except (RuntimeError, ValueError, OSError) as e:
            sys.exit(f"error: could not load GPT-2 weights '{init_from}': {e}. A folder holding config.json and "
                     f"model.safetensors also works as --init_from.")
        model = lm if cls is GPT else _transplant(lm.state_dict(), lm.config, cls)
    else:
        if not init_from.endswith(".pt") and not os.path.exists(init_from):
            sys.exit(f"error: init_from '{init_from}' is neither 'scratch', a GPT-2 name ({', '.join(GPT2_SIZES)}), "
                     f"a Hugging Face folder, nor an existing checkpoint file")
        ckpt = load_checkpoint(init_from)
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
    """Appends one JSON dict per call to out_dir/metrics.jsonl and prints one progress line."""

    def __init__(self, out_dir, total_steps, resume=False):
        self.path = os.path.join(out_dir, "metrics.jsonl")
        os.makedirs(out_dir, exist_ok=True)
        if not resume and os.path.exists(self.path):
            os.remove(self.path)
        self.total, self.t0, self.step0 = total_steps, time.time(), None

    def log(self, step, metrics, keys=None):
        """Log `metrics` for `step` (1-based); print `keys` (default: all) with the ETA."""
        if self.step0 is None:  # the clock starts at the first logged step; ETA from the steps since
            self.step0, self.t0 = step, time.time()
        done = step - self.step0
        eta = format_time((time.time() - self.t0) / done * (self.total - step)) if done > 0 else "?"
        row = {"step": step, **{k: (float(v) if isinstance(v, (int, float)) else v) for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        shown = " | ".join(f"{k} {_fmt(metrics[k])}" for k in (keys or metrics) if k in metrics)
        print(f"step {step}/{self.total} | {shown} | eta {eta}", flush=True)


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
    os.replace(tmp, png_path)
    return png_path
