"""Launched by tests/test_distributed.py under torchrun: runs a stage's command line on every rank,
the all-reduce whitening check, or one PPO update on each rank's share of a global batch, and leaves
what each rank ends with in files the test compares.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/dist_run.py sft \\
        --max_steps 3 ...
    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/dist_run.py whiten OUT_DIR
    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/dist_run.py ppo_update \\
        CASE OUT_DIR

Stages write files on rank 0 only; here every rank also saves the weights it would checkpoint to
$RANK_COPIES/<checkpoint name>.rank<r> (through the stage's save_checkpoint), so ranks can be
compared. $FAIL_ON_RANK=r makes rank r alone fail in its first training batch (sft: collate raises
an assertion). $PLAIN_SGD=1 gives the stage plain SGD instead of AdamW (its step shows the
gradient's scale). $RECORD_ROLLOUTS=DIR saves each rank's rollout batch of each iteration to
DIR/rollout.it<i>.rank<r> (its queries, rewards, response mask and advantages).
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import lib.config  # noqa: E402
import lib.ddp  # noqa: E402
import lib.tokens  # noqa: E402


def whiten_check(out_dir):
    """Each rank whitens its own part (3 and 5 rows of ragged masks) with the all-reduce helper."""
    import ppo
    rank, _ = lib.ddp.init_distributed("cpu")
    g = torch.Generator().manual_seed(rank)
    rows = 3 + 2 * rank
    # (rows, 6): a different mean and scale per rank
    x = torch.randn(rows, 6, generator=g) * (1 + rank) + rank
    lengths = torch.randint(1, 7, (rows, 1), generator=g)
    mask = (torch.arange(6)[None, :] < lengths).float()  # (rows, 6)
    values = torch.randn(rows, 6, generator=g)
    torch.save({"x": x, "mask": mask, "values": values, "whitened": ppo.whiten(x, mask),
                "explained_var": ppo.explained_variance(values, x, mask),
                "var": lib.ddp.global_masked_var(x, mask)},
               os.path.join(out_dir, f"whiten.rank{rank}"))
    lib.ddp.close_distributed()


def ppo_sgd_step(case, rows, ptx_rows, accumulation):
    """One ppo_update on rows `rows` of the case's rollout batch and the ptx texts `ptx_rows`:
    one epoch, one minibatch of all the rows in `accumulation` micro-batches, no gradient clipping,
    plain SGD (its step is proportional to the gradient, where Adam's first step is nearly
    invariant to the gradient's scale), from the case's weights; DDP-wrapped under torchrun.
    Returns the policy's and critic's weights after it, and the statistics."""
    import ppo
    from model import GPT, GPTConfig, ScalarGPT
    policy, critic = GPT(GPTConfig(**case["shape"])), ScalarGPT(GPTConfig(**case["shape"]))
    policy.load_state_dict(case["policy"])
    critic.load_state_dict(case["critic"])
    # every entry is (B, ...): ids, queries, masks, ...
    batch = {k: v[rows] for k, v in case["batch"].items()}
    # (len(ptx_rows), T) padded here, as by train()
    ptx = lib.tokens.pad_right([case["ptx"][i] for i in ptx_rows])
    cfg = ppo.Config(**case["cfg"], batch_size=len(rows), minibatch_size=len(rows), noptepochs=1,
                     grad_accum=accumulation, ptx_batch_size=len(ptx_rows), grad_clip=0.0)
    params = list(policy.parameters()) + list(critic.parameters())
    optimizer = torch.optim.SGD(params, lr=case["lr"])
    device = torch.device("cpu")
    stats = ppo.ppo_update(lib.ddp.wrap_ddp(policy, device), lib.ddp.wrap_ddp(critic, device),
                           optimizer, batch, cfg, iter([ptx]), torch.Generator().manual_seed(0))
    return policy.state_dict(), critic.state_dict(), stats


def ppo_update_check(case_path, out_dir):
    """Each rank takes its contiguous share of the global rollout batch's rows and of the ptx texts
    and runs ppo_sgd_step on them in 2 micro-batches; saves the weights after the step and the
    statistics."""
    rank, world = lib.ddp.init_distributed("cpu")
    case = torch.load(case_path, weights_only=True)
    B, n_ptx = case["batch"]["ids"].size(0), len(case["ptx"])
    rows = list(range(rank * B // world, (rank + 1) * B // world))
    ptx_rows = list(range(rank * n_ptx // world, (rank + 1) * n_ptx // world))
    policy, critic, stats = ppo_sgd_step(case, rows, ptx_rows, accumulation=2)
    torch.save({"policy": policy, "critic": critic, "stats": stats},
               os.path.join(out_dir, f"ppo_update.rank{rank}"))
    lib.ddp.close_distributed()


def run_stage(name, argv):
    stage = __import__(name)
    copies, rank = os.environ.get("RANK_COPIES"), int(os.environ["RANK"])
    if copies:
        save = stage.save_checkpoint

        def save_on_every_rank(path, model, cfg, **extra):
            critic = {k: extra[k] for k in ("critic",) if k in extra}
            state = {"model": model.state_dict(), **critic}
            torch.save(state, os.path.join(copies, f"{os.path.basename(path)}.rank{rank}"))
            return save(path, model, cfg, **extra)
        stage.save_checkpoint = save_on_every_rank
    if os.environ.get("PLAIN_SGD"):  # a step proportional to the gradient (Adam's first is not)
        stage.make_adamw = lambda params, lr, *_, **__: torch.optim.SGD(params, lr)
    record = os.environ.get("RECORD_ROLLOUTS")
    if record:
        rollout = stage.rollout

        def recorded_rollout(models, queries, query_mask, *args, iteration="?", **kw):
            batch, stats = rollout(models, queries, query_mask, *args, iteration=iteration, **kw)
            keys = ("rewards", "response_mask", "advantages")
            torch.save({"queries": queries, "query_mask": query_mask,
                        **{k: batch[k] for k in keys}},
                       os.path.join(record, f"rollout.it{iteration}.rank{rank}"))
            return batch, stats
        stage.rollout = recorded_rollout
    if os.environ.get("FAIL_ON_RANK") == str(rank):
        def failing_collate(examples):
            raise lib.config.UsageError(f"injected failure on rank {rank}")
        stage.collate = failing_collate
    sys.argv = [f"{name}.py"] + argv
    lib.config.run(stage.train, stage.Config, stage.CONFIGS)


if __name__ == "__main__":
    if sys.argv[1] == "whiten":
        whiten_check(sys.argv[2])
    elif sys.argv[1] == "ppo_update":
        ppo_update_check(sys.argv[2], sys.argv[3])
    else:
        run_stage(sys.argv[1], sys.argv[2:])
