"""
Command-line configuration, shared by every script: `python ppo.py --config small --lr 1e-5`
builds the stage's Config dataclass from its defaults < a named preset < the flags, refuses values
out of range with one message, prints and saves the result; `run` is every script's entry point.
Also the model-size presets and `load_function` for "file.py:NAME" arguments. Plumbing: a reader
of the algorithm may skip this file.
"""
import argparse
import dataclasses
import functools
import importlib
import importlib.util
import inspect
import json
import math
import os
import re
import sys
import typing

from lib.checkpoints import GPT2_SIZES, atomic_write_text
from lib.data import PREPARE_HINT
from lib.ddp import close_distributed, is_main, rank_tag

# Model-size part of the presets, defined once for every script. `tiny` trains from scratch on a
# CPU; the others are OpenAI's GPT-2 sizes (124M, 355M, 774M, 1.5B) loaded from pretrained weights.
MODEL_PRESETS = {
    "tiny": dict(n_layer=4, n_head=4, n_embd=256, block_size=512),
    "small": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024),
    "medium": dict(n_layer=24, n_head=16, n_embd=1024, block_size=1024),
    "large": dict(n_layer=36, n_head=20, n_embd=1280, block_size=1024),
    "xl": dict(n_layer=48, n_head=25, n_embd=1600, block_size=1024),
}
GPT2_NAMES = {"tiny": "scratch", "small": "gpt2", "medium": "gpt2-medium", "large": "gpt2-large",
              "xl": "gpt2-xl"}

# `preset`, the name of the --config preset, is a field of every stage's Config that parse_config
# sets itself (recorded for the run): a flag, but not one --help lists.
INTERNAL_FIELDS = ("preset",)

# A model's shape fields are used for a model drawn from scratch only: one loaded from a
# checkpoint, a GPT-2 name or a folder (the stage's model source field) has its own shape, and
# load_model prints it.
SHAPE_FIELDS = ("n_layer", "n_head", "n_embd", "block_size")
MODEL_SOURCES = ("init_from", "sft_ckpt")

# The range of every numeric (and choice) config field, by name, for all scripts: parse_config
# refuses a value outside it with one message. A stage's Config may override a rule with a class
# attribute `RANGES = {field: rule}`. A rule is a bound (">= 1", "> 0"), an interval ("(0, 1]":
# round bracket = open end), or a tuple of allowed values. Non-finite numbers (nan, inf) are
# never in range.
FIELD_RANGES = {
    # model shape
    **dict.fromkeys(("n_layer", "n_head", "n_embd", "block_size"), ">= 1"),
    "dropout": "[0, 1)",
    # counts: tokens, batches, steps, intervals
    **dict.fromkeys(("max_prompt_tokens", "max_response_tokens", "max_new_tokens", "max_prompts",
                     "num_samples", "batch_size", "minibatch_size", "grad_accum",
                     "max_steps", "epochs", "iters", "noptepochs", "ptx_batch_size",
                     "eval_interval", "log_interval", "sample_every", "eval_examples",
                     "eval_prompts", "kl_horizon"), ">= 1"),
    **dict.fromkeys(("num_eval_samples", "n_samples", "warmup_steps", "warmup_iters", "seed"),
                    ">= 0"),
    "ptx_max_tokens": ">= 2",  # an input token and the token it predicts
    # optimizer
    "lr": "> 0", "min_lr": ">= 0", "min_lr_frac": "[0, 1]", "weight_decay": ">= 0",
    "beta1": "[0, 1)", "beta2": "[0, 1)", "adam_eps": "> 0", "grad_clip": ">= 0",
    # sampling
    "temperature": ">= 0", "top_k": ">= 1", "top_p": "(0, 1]",
    # rlhf
    "cliprange": "> 0", "cliprange_value": "> 0", "vf_coef": ">= 0", "gamma": "[0, 1]",
    "lam": "[0, 1]", "kl_coef": ">= 0", "kl_target": "> 0", "ptx_coef": ">= 0",
    "missing_eos_penalty": ">= 0",
    # memory: LoRA adapters, the policy's EMA
    "lora_rank": ">= 0", "lora_alpha": "> 0", "lora_dropout": "[0, 1)", "ema_decay": "[0, 1)",
    # system
    "dtype": ("auto", "bfloat16", "float32"),
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
    """{field: its trailing comment} from the dataclass source: --help shows each one's meaning."""
    try:
        source = inspect.getsource(config_cls)
    except (OSError, TypeError):
        return {}
    fields = re.finditer(r"^\s+(\w+):[^#\n]*#(.*)$", source, re.M)  # name: ... = ...  # comment
    return {m.group(1): m.group(2).strip() for m in fields}


def parse_config(config_cls, presets, argv=None):
    """Build a `config_cls` from `--config NAME` (a key of `presets`) and `--field value` flags."""
    fields = dataclasses.fields(config_cls)
    names = ", ".join(f"--{f.name}" for f in fields if f.name not in INTERNAL_FIELDS)
    parser = argparse.ArgumentParser(
        description=sys.modules["__main__"].__doc__ if argv is None else None,
        formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    parser.error = lambda msg: (parser.print_usage(sys.stderr),
                                sys.exit(f"error: {msg}\nvalid options: --config, {names}"))
    parser.add_argument("--config", choices=sorted(presets),
                        help="named configuration (applied before the flags)")
    defaults = config_cls()
    docs = _field_comments(config_cls)
    for f in fields:
        t = _field_type(config_cls, f)
        default = getattr(defaults, f.name)
        parse = _parse_bool if t is bool else _parse_optional(t) if default is None else t
        doc = f"{docs.get(f.name, '')} (default: {default!r})".lstrip()
        doc = argparse.SUPPRESS if f.name in INTERNAL_FIELDS else doc.replace("%", "%%")  # argparse
        flag = dict(nargs="?", const=True) if t is bool else {}  # a bare --chat means --chat true
        parser.add_argument(f"--{f.name}", type=parse, default=None, metavar=t.__name__.upper(),
                            help=doc, **flag)  # %-formats help strings
    args = parser.parse_args(argv)
    values = dict(presets[args.config]) if args.config else {}
    unknown = set(values) - {f.name for f in fields}
    if unknown:  # a bug in the script's presets, not the user's flags
        raise ValueError(f"preset {args.config} sets unknown fields {unknown}")
    values.update({k: v for k, v in vars(args).items() if k != "config" and v is not None})
    if args.config:
        values["preset"] = args.config  # recorded for the run; dropped if the Config has no preset
    values = {k: v for k, v in values.items() if k in {f.name for f in fields}}
    cfg = config_cls(**values)
    check_ranges(cfg)
    device = getattr(cfg, "device", None)
    if isinstance(device, str) and not re.fullmatch(r"auto|cpu|cuda(:\d+)?", device):
        sys.exit(f"error: --device {cfg.device} is not a device this project runs on: it must be "
                 f"auto, cpu, cuda or cuda:N")
    if hasattr(cfg, "n_embd") and hasattr(cfg, "n_head") and cfg.n_embd % cfg.n_head:
        sys.exit(f"error: --n_embd {cfg.n_embd} must be a multiple of --n_head {cfg.n_head} (each "
                 f"head gets n_embd / n_head channels)")
    return cfg


def in_range(value, rule):
    """Whether `value` satisfies a FIELD_RANGES rule: ">= 1", "> 0", "(0, 1]" or a tuple."""
    if isinstance(rule, tuple):
        return value in rule
    if not math.isfinite(value):
        return False
    if rule[0] in "([":
        lo, hi = (float(b) for b in rule[1:-1].split(","))
        above = lo < value if rule[0] == "(" else lo <= value
        below = value < hi if rule[-1] == ")" else value <= hi
        return above and below
    op, bound = rule.split()
    return value > float(bound) if op == ">" else value >= float(bound)


def check_ranges(cfg):
    """Exit with one message naming the first field of `cfg` outside its range (FIELD_RANGES, then
    the Config's own RANGES). None (an optional field left unset) is always allowed."""
    rules = {**FIELD_RANGES, **getattr(cfg, "RANGES", {})}
    for f in dataclasses.fields(cfg):
        value, rule = getattr(cfg, f.name), rules.get(f.name)
        if rule is None or value is None or isinstance(value, bool):
            continue
        if isinstance(rule, str) and not isinstance(value, (int, float)):
            continue
        if not in_range(value, rule):
            want = (f"one of {', '.join(rule)}" if isinstance(rule, tuple)
                    else f"in {rule}" if rule[0] in "([" else rule)
            meaning = _field_comments(type(cfg)).get(f.name)
            sys.exit(f"error: --{f.name} {value} is out of range: it must be {want}"
                     + (f" ({f.name}: {meaning})" if meaning else ""))


class UsageError(Exception):
    """Settings or inputs that cannot work together, found once the models and data are loaded
    (e.g. token budgets that do not fit a checkpoint's block_size). `run` ends the script with
    the message alone."""


def require(ok, message):
    """Check the user's settings: raise UsageError(message) unless ok. Never `assert`, which
    `python -O` removes and which would make a user's mistake look like a bug."""
    if not ok:
        raise UsageError(message)


# What each path flag must be, checked where the flags are parsed (a Config lists its path flags in
# a class attribute PATHS = {field: kind}). A flag whose default is "" is optional: "" skips it.
PATH_KINDS = {
    "file": "an existing file",
    "dir": "an existing folder",
    "data_file": ("an existing file in --data_dir (or an absolute path); "
                  "comma-separated for several"),
    "out_dir": "a folder to write to (it may not exist yet), not a file",
    "out_file": "a file to write to (it may not exist yet), not a folder",
    "checkpoint": "a checkpoint file of this project (e.g. out/ppo/ckpt.pt)",
    "model": "a checkpoint file of this project (e.g. out/sft/ckpt.pt), a Hugging Face GPT-2 "
             "folder, 'scratch' or a GPT-2 name (" + ", ".join(GPT2_SIZES) + ")",
}


def path_problem(path, kind):
    """What is wrong with `path` as a PATH_KINDS `kind`, or None."""
    if not path:
        return "is empty"
    if kind == "model" and (path in ("scratch", *GPT2_SIZES) or os.path.isfile(path)):
        return None
    if kind == "model" and os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "config.json")):
            return None  # a Hugging Face folder (GPT-2's own, or export.py's)
        inside = os.path.join(path, "ckpt.pt")
        if os.path.isfile(inside):
            return f"is a run's folder, not a checkpoint: pass {inside}"
        return "is a folder without config.json (not a Hugging Face GPT-2 folder)"
    if kind in ("file", "data_file", "checkpoint", "model", "dir"):
        if not os.path.exists(path):
            return "does not exist"
        if kind in ("file", "data_file", "checkpoint") and not os.path.isfile(path):
            return "is a folder"
        if kind == "dir" and not os.path.isdir(path):
            return "is a file"
        return None
    if os.path.exists(path):  # out_dir, out_file: existing is fine if it is of the right sort
        return "is a file" if kind == "out_dir" and not os.path.isdir(path) else \
            "is a folder" if kind == "out_file" and os.path.isdir(path) else None
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    return None if os.path.isdir(parent) else f"cannot be created: {parent} is a file"


def check_paths(cfg):
    """Exit with one line naming the flag, the path and what it should be, for the first path flag
    of `cfg` (its Config's PATHS) that cannot work. A run with --resume true takes its weights from
    out_dir, so its init_from is not checked."""
    defaults = type(cfg)()
    for name, kind in getattr(cfg, "PATHS", {}).items():
        value = getattr(cfg, name)
        if name == "init_from" and getattr(cfg, "resume", False):
            continue
        if value == "":
            if getattr(defaults, name) == "":
                continue
            sys.exit(f"error: --{name} is empty: it must be {PATH_KINDS[kind]}")
        several = kind in ("model", "data_file")  # comma-separated
        given_paths = [p.strip() for p in value.split(",") if p.strip()] if several else [value]
        if not given_paths:
            sys.exit(f"error: --{name} {value!r} names no path: it must be {PATH_KINDS[kind]}")
        for given in given_paths:
            path = os.path.join(cfg.data_dir, given) if kind == "data_file" else given
            problem = path_problem(path, kind)
            if problem:
                where = f"{given}: {path}" if path != given else given
                missing_data = kind == "data_file" and problem == "does not exist"
                hint = f". {PREPARE_HINT}" if missing_data else ""
                sys.exit(f"error: --{name} {where} {problem}; it must be {PATH_KINDS[kind]}{hint}")


def run(train, config_cls, presets):
    """A stage's command-line entry: parse the flags, check the paths they name, then train(). A
    failed check of the settings (`require`) ends with its message alone, and so does a diverged run
    (a FloatingPointError from check_finite or GPT.generate)."""
    cfg = parse_config(config_cls, presets)
    check_paths(cfg)
    finished = False
    try:
        out = train(cfg)
        finished = True
        return out
    except UsageError as e:
        sys.exit(f"error{rank_tag()}: {e}")
    except FloatingPointError as e:  # check_finite: a diverged run; or NaN/inf in GPT.generate
        sys.exit(f"error{rank_tag()}: {e}")
    finally:
        close_distributed(finished)


def print_config(cfg, out_dir=None):
    """Print the resolved config and save it as out_dir/config.json.

    When the model comes from a checkpoint or GPT-2 rather than scratch, its shape is that
    source's: the shape fields print as "(from init_from)" and load_model prints the shape it
    loaded; config.json keeps the values as given."""
    d = dataclasses.asdict(cfg)
    shown = dict(d)
    source = next((name for name in MODEL_SOURCES if name in d), None)
    if source and d[source] != "scratch":
        shown.update({k: f"(from {source})" for k in SHAPE_FIELDS if k in d})
    print("config: " + " ".join(f"{k}={v}" for k, v in shown.items()))
    if out_dir and is_main():
        atomic_write_text(os.path.join(out_dir, "config.json"), json.dumps(d, indent=2) + "\n")


def load_function(spec, arg=None, takes=None):
    """"path/to/file.py:NAME" or "module:NAME" -> the object NAME; with `arg`, NAME(arg) (a
    factory's product).
    takes: the arguments the function will be called with, e.g. ("prompt", "response"): one it
    cannot take them is refused now, not at its first call, and what it returns must be a number
    (a clear error otherwise)."""
    path, sep, name = spec.rpartition(":")
    if not sep or not path or not name:
        sys.exit(f"error: expected path/to/file.py:NAME (or module:NAME), got '{spec}'")
    if path.endswith(".py"):
        if not os.path.isfile(path):
            sys.exit(f"error: {path} not found (from '{spec}')")
        module_name = os.path.splitext(os.path.basename(path))[0]
        module_spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(module_spec)
        sys.path.insert(0, os.path.dirname(os.path.abspath(path)))  # it may import its neighbours
        try:
            module_spec.loader.exec_module(module)
        except Exception as e:  # a syntax error, a failed import, ...: one line that names it
            sys.exit(f"error: could not load {path} (from '{spec}'): {type(e).__name__}: {e}")
        finally:
            sys.path.pop(0)
    else:
        try:
            module = importlib.import_module(path)
        except ImportError as e:
            sys.exit(f"error: could not import '{path}' (from '{spec}'): {e}")
    if not hasattr(module, name):
        sys.exit(f"error: {path} defines no '{name}'")
    fn = getattr(module, name)
    if arg is not None:
        fn = fn(arg)
    shown = f"'{spec}'" + (f"({arg!r})" if arg is not None else "")
    if not callable(fn):
        sys.exit(f"error: {shown} is not callable")
    if takes:
        try:
            inspect.signature(fn).bind(*takes)
        except TypeError:
            factory = (" (a factory? give its argument with --labeler_arg / --judge_arg)"
                       if arg is None else "")
            sys.exit(f"error: {shown} has the signature {inspect.signature(fn)}, but it is called "
                     f"as f({', '.join(takes)}){factory}")
        except ValueError:  # a builtin without a signature: trust it
            pass

        @functools.wraps(fn)
        def as_number(*args):
            value = fn(*args)
            try:
                return float(value)
            except (TypeError, ValueError):
                sys.exit(f"error: {shown} returned {value!r}, not a number: it is called as "
                         f"f({', '.join(takes)}) and must return a float")
        return as_number
    return fn
