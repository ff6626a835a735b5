"""
Checkpoints and files that must survive a crash: atomic writes (temp file + fsync + rename), saving
and loading checkpoints (`weights_only=True`), building a GPT or ScalarGPT from any source (scratch,
a GPT-2 name, a Hugging Face folder, a checkpoint), and fetching GPT-2's weights from the Hugging
Face hub. Plumbing: a reader of the algorithm may skip this file.
"""
import dataclasses
import os
import sys

import torch

from lib.ddp import is_main
from lib.training import check_finite
from model import (
    GPT,
    GPTConfig,
    LoRALinear,
    ScalarGPT,
    add_lora,
    load_hf_gpt2,
    lora_state_dict,
    merged_state_dict,
)


def fsync_replace(tmp, path):
    """Rename the finished file `tmp` to `path`, durably: its data is flushed to disk (fsync)
    before the rename and the directory entry after it, so a power loss leaves the old file or the
    complete new one under `path`, never an empty one. Every atomic writer (checkpoints, config,
    plots, prepared data) ends here."""
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


def save_checkpoint(path, model, cfg, base=None, **extra):
    """Write atomically (temp file + fsync + rename): a crash mid-write never destroys the previous
    checkpoint, and weights holding NaN or inf (a diverged run) are never written. Under torchrun
    only rank 0 writes (every rank holds the same weights).

    A model with LoRA adapters is saved as its adapters and trained heads only, with "lora"
    saying how to rebuild it: `base` = lora_base(...) (the source its frozen weights came from)
    and the adapters' shape. load_model rebuilds it from there and hands every other script the
    merged weights."""
    if not is_main():
        return path
    model = getattr(model, "_orig_mod", model)  # unwrap torch.compile
    lora = lora_settings(model)
    if lora and base is None:
        raise ValueError("save_checkpoint: a model with adapters needs base=lora_base(...) "
                         "to be rebuilt from")
    state = lora_state_dict(model) if lora else model.state_dict()
    step = extra.get("step", extra.get("iteration", "?"))
    for name, weights in (("model", state), ("critic", extra.get("critic") or {})):
        for t in weights.values():
            if t.is_floating_point():
                check_finite(t, step, f"a {name} weight to be saved in {path}")
    ckpt = {"kind": "scalar" if isinstance(model, ScalarGPT) else "gpt",
            "model_config": dataclasses.asdict(model.config),
            # frozen weights kept in bf16 are saved in fp32
            "model": {k: v.float() if v.is_floating_point() else v for k, v in state.items()},
            "lora": {**lora, **base} if lora else None,
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
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        # the first line: torch's weights_only explanation runs for lines
        first = (str(e).strip().splitlines() or [""])[0][:200]
        sys.exit(f"error: could not read checkpoint {path} ({type(e).__name__}: {first}). "
                 f"It may be truncated or not a checkpoint of this project.")
    if not isinstance(ckpt, dict) or not {"kind", "model", "model_config"} <= set(ckpt) or \
            ckpt["kind"] not in KINDS:
        sys.exit(f"error: {path} is a PyTorch file but not a checkpoint of this project (one holds "
                 f"the model kind, its shape and weights: written by sft.py, reward.py or ppo.py).")
    return ckpt


def check_resumable(ckpt, path, keys, writer, lora_rank=0):
    """A checkpoint to --resume from must hold the training state `writer` saves (`keys`), not only
    weights, and adapters of the rank asked for (or none, without --lora_rank)."""
    missing = [k for k in keys if k not in ckpt]
    if missing:
        sys.exit(f"error: {path} cannot be resumed from: it holds no {', '.join(missing)}, so it "
                 f"is not a checkpoint {writer} writes while training. Point --out_dir at the "
                 f"interrupted run, or drop --resume to start afresh.")
    saved_rank = (ckpt.get("lora") or {}).get("rank", 0)
    if saved_rank != lora_rank:
        sys.exit(f"error: {path} was written with --lora_rank {saved_rank}: resume with the same "
                 f"--lora_rank (not {lora_rank})")


def lora_settings(model):
    """{"rank", "alpha", "dropout"} of a model's adapters, or None for a model without them."""
    layer = next((m for m in model.modules() if isinstance(m, LoRALinear)), None)
    if layer is None:
        return None
    rank = layer.lora_A.size(0)
    return {"rank": rank, "alpha": layer.scale * rank, "dropout": layer.lora_dropout.p}


def lora_base(source, kind="gpt", transplant=False, seed=None):
    """Where a LoRA model's frozen weights come from, as load_model is asked for them: a checkpoint,
    a GPT-2 name or folder, or scratch with its seed."""
    return {"base": source, "base_kind": kind, "base_transplant": transplant, "base_seed": seed}


def load_lora_model(ckpt, source, dropout=0.0, device="cpu"):
    """The model a LoRA checkpoint describes, adapters attached: its base rebuilt from
    ckpt["lora"] (merged, if that base is itself a LoRA checkpoint), adapters added, and the
    saved adapters and heads loaded."""
    lora = ckpt["lora"]
    base, _ = load_model(lora["base"], lora["base_kind"], ckpt["model_config"], dropout, device,
                         transplant=lora["base_transplant"], seed=lora["base_seed"])
    if (ckpt["kind"] == "scalar") != isinstance(base, ScalarGPT):
        raise ValueError(f"{source}: its base {lora['base']} gives a model of another kind")
    model = add_lora(base, lora["rank"], lora["alpha"], lora["dropout"])
    for name, p in model.named_parameters():  # the heads it trained (a reward model's score_head)
        p.requires_grad_("lora_" in name or name in ckpt["model"])
    load_adapters(model, ckpt["model"], source)
    return model.to(device)


def load_adapters(model, state, source):
    """Load the adapters and trained heads saved in `state` into a model with
    adapters, and nothing else."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    needed = set(lora_state_dict(model))
    if unexpected or needed - set(state):
        sys.exit(f"error: the adapters in {source} do not fit this model (missing "
                 f"{sorted(needed - set(state))[:3]}, unexpected {unexpected[:3]}): another "
                 f"--lora_rank, or another base model")


KINDS = {"gpt": "a language model (written by sft.py or ppo.py)",
         "scalar": "a reward model (written by reward.py)"}
WANTED = {
    "gpt": "pass an SFT or PPO checkpoint (e.g. out/sft/ckpt.pt), a GPT-2 name, or scratch",
    "scalar": ("pass the checkpoint reward.py wrote (e.g. out/reward/ckpt.pt), or scratch for a "
               "demo run"),
}


def load_model(init_from, kind="gpt", model_cfg=None, dropout=0.0, device="cpu", transplant=False,
               seed=None, adapters=False):
    """Build a GPT (kind="gpt") or ScalarGPT (kind="scalar") from any source.

    init_from: "scratch" (fresh weights of shape `model_cfg`), a GPT-2 name (gpt2, gpt2-medium,
    ...), a folder in Hugging Face format (GPT-2's, or one written by export.py), or a checkpoint
    file of this project.
    transplant: where a stage initialises a new model from another kind (reward.py's reward model
    from the SFT model, a critic), a source of the other kind gives its trunk and the head stays
    fresh (InstructGPT 3.5). Without it the source must be a trained model of `kind`: a language
    model for a policy, and for kind="scalar" a normalised reward model written by reward.py;
    anything else is an error.
    seed: draw scratch weights from torch.manual_seed(seed), leaving the global random state as it
    was, so the same model comes out whatever ran before (e.g. a resumed run that loaded other
    checkpoints first).
    A LoRA checkpoint (save_checkpoint of a model with adapters) is rebuilt from its base and comes
    back with its adapters merged into the weights, a plain model like any other; adapters=True
    keeps them attached (a stage resuming its own LoRA run).
    Returns (model, checkpoint dict or None); for an exported folder the dict holds its "kind", the
    run's "config" (and a reward model's "reward_shift").
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
            sys.exit(f"error: could not load GPT-2 weights from {folder} ({type(e).__name__}: "
                     f"{e}). --init_from takes a folder holding config.json and model.safetensors "
                     f"in the Hugging Face GPT-2 format.")
        ckpt = hf.get("instructgpt")  # written by export.py: model kind and the run's config
        if ckpt is None and kind != "gpt" and not transplant:
            sys.exit(f"error: {init_from} is a pretrained GPT-2 language model, but {KINDS[kind]} "
                     f"is expected here; {WANTED[kind]}")
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
            sys.exit(f"error: init_from '{init_from}' is neither 'scratch', a GPT-2 name "
                     f"({', '.join(GPT2_SIZES)}), a Hugging Face folder, nor an existing "
                     f"checkpoint file")
        ckpt = load_checkpoint(init_from)
        _check_kind(init_from, ckpt, kind, transplant)
        config = GPTConfig(**{**ckpt["model_config"], "dropout": dropout})
        state = ckpt["model"]
        if ckpt.get("lora"):
            lora_model = load_lora_model(ckpt, init_from, dropout, device)
            if adapters:
                return lora_model, ckpt
            state = merged_state_dict(lora_model)
        if ckpt["kind"] == kind:
            model = cls(config)
            load_state(model, state, init_from)
        else:
            model = _transplant(state, config, cls)
    if model_cfg and init_from != "scratch":  # the shape print_config shows as "(from init_from)"
        shape = ", ".join(f"{k}={getattr(model.config, k)}"
                          for k in ("n_layer", "n_head", "n_embd", "block_size"))
        print(f"model shape from {init_from}: {shape}")
    return model.to(device), ckpt


def _check_kind(init_from, ckpt, kind, transplant):
    """A trained model of `kind` must come from a source of that kind, unless a
    stage transplants (load_model)."""
    if ckpt["kind"] != kind and not transplant:
        sys.exit(f"error: {init_from} holds {KINDS[ckpt['kind']]}, but {KINDS[kind]} is expected "
                 f"here; {WANTED[kind]}")
    if kind == "scalar" and not transplant and "reward_shift" not in ckpt:
        sys.exit(f"error: {init_from} holds a scalar model without reward.py's normalisation "
                 f"(reward_shift), but a trained, normalised reward model is expected here; "
                 f"{WANTED[kind]}")


def load_state(model, state_dict, source):
    """load_state_dict with one clear message when the weights are of another shape or kind."""
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as e:
        first = str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else str(e)
        sys.exit(f"error: the weights in {source} do not fit this model ({first}). The checkpoint "
                 f"was written for another model shape or kind; pass a matching checkpoint or "
                 f"matching size flags.")


def _transplant(state_dict, config, cls):
    """Copy the shared transformer trunk into a model of another kind (its
    head stays as initialised)."""
    model = cls(config)
    trunk = {k: v for k, v in state_dict.items() if k.startswith("transformer.")}
    missing, unexpected = model.load_state_dict(trunk, strict=False)
    if unexpected or any(k.startswith("transformer.") for k in missing):
        raise RuntimeError(f"transplant: trunk weights do not fit (missing {missing}, unexpected "
                           f"{unexpected})")
    return model


# ----------------------------------------------------------------------------------------------
# GPT-2 weights from the Hugging Face hub, through its own client: a copy already in the
# Hugging Face cache (e.g. from transformers) is used as is, and HF_ENDPOINT, HF_TOKEN,
# HF_HUB_CACHE, HF_HUB_OFFLINE work

GPT2_SIZES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")


def fetch_gpt2(name):
    """The local folder (in the Hugging Face cache) holding config.json + model.safetensors of
    GPT-2 `name`; downloaded once, with the hub's progress bars. Offline without a cached copy:
    one message saying what to do."""
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError
    files = ("config.json", "model.safetensors")
    # transformers users have GPT-2 cached as "gpt2" or, in newer examples, "openai-community/gpt2":
    # the first is fetched if needed, the second only looked up in the cache
    for repo in (name, f"openai-community/{name}"):
        try:
            paths = [hf_hub_download(repo, f, local_files_only=repo != name) for f in files]
            return os.path.dirname(paths[0])  # this revision's snapshot folder holds both files
        except LocalEntryNotFoundError:
            continue
        except Exception as e:  # repository or network errors of the hub client
            sys.exit(f"error: could not download GPT-2 weights '{name}' from the Hugging Face hub "
                     f"({type(e).__name__}: {e}). A local folder holding {' and '.join(files)} "
                     f"also works as --init_from.")
    offline = " (HF_HUB_OFFLINE is set)" if constants.HF_HUB_OFFLINE else ""
    sys.exit(f"error: GPT-2 weights '{name}' are not in the Hugging Face cache "
             f"({constants.HF_HUB_CACHE}) and could not be downloaded{offline}. Either connect "
             f"once to the internet (or a mirror set in HF_ENDPOINT) and run `hf download {name} "
             f"{' '.join(files)}`, or copy those two files from "
             f"https://huggingface.co/openai-community/{name} into a folder and pass --init_from "
             f"FOLDER.")
