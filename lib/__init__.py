"""
The library layer under the scripts: what they share, one concern per module. Scripts (sft.py,
reward.py, ppo.py, dpo.py, sample.py, label.py, evaluate.py, export.py, pipeline.py, data/*/) import
these modules and model.py, never each other (tests/test_layout.py checks it).

What a reader of the algorithm needs:
    tokens.py       GPT-2's tokenizer, prompts and responses within their budgets, padding
    responses.py    sampling responses, their logprobs, reward-model scores and KL, written once
    winrate.py      win rates and their Wilson intervals

Plumbing a reader may skip:
    config.py       command-line config (defaults < preset < flags), ranges, model-size presets,
                    entry point
    data.py         reading the JSON-lines files, the shuffled batch order
    training.py     device and precision, AdamW, learning-rate schedule, divergence check, random
                    state
    checkpoints.py  checkpoints, atomic writes, building a model from any source, GPT-2 from the hub
    tracking.py     progress lines, metrics.jsonl, wandb / TensorBoard, plots
    ddp.py          torchrun + DDP helpers, token-weighted gradient accumulation
"""
