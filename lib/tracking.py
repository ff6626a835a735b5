"""
Metrics: one progress line per step with an ETA, the same numbers appended to out_dir/metrics.jsonl
(and, if asked, to Weights & Biases or TensorBoard), and the plots made from that file. Plumbing: a
reader of the algorithm may skip this file.
"""
import dataclasses
import json
import math
import os
import sys
import time

from lib.checkpoints import atomic_write_text, fsync_replace
from lib.data import read_jsonl
from lib.ddp import is_main


def format_time(seconds):
    seconds = int(max(seconds, 0))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class MetricsLog:
    """Appends one JSON dict per call to out_dir/metrics.jsonl and prints one progress line (rank 0
    only). With `log_to` ("wandb", "tensorboard" or both, comma-separated) the same numbers go there
    too, under the same names.

    resume_step: None starts a fresh file; a step number (that of the checkpoint a run resumes from)
    keeps the rows up to it and drops later ones, logged by the interrupted run after its last
    checkpoint and about to be logged again, so the file (and its plot) stays one curve with one row
    per step."""
    def __init__(self, out_dir, total_steps, resume_step=None, log_to="", run_config=None):
        self.path = os.path.join(out_dir, "metrics.jsonl")
        os.makedirs(out_dir, exist_ok=True)
        if is_main() and resume_step is None and os.path.exists(self.path):
            os.remove(self.path)
        elif is_main() and resume_step is not None and os.path.exists(self.path):
            kept = [r for r in read_metrics(self.path) if r["step"] <= resume_step]
            atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        self.total, self.t0, self.step0 = total_steps, time.time(), None
        # rank 0 logs
        names = [name.strip() for name in log_to.split(",") if name.strip()] if is_main() else []
        self.trackers = [open_tracker(name, out_dir, run_config) for name in names]

    def log(self, step, metrics, keys=None):
        """Log `metrics` for `step` (1-based); print `keys` (default: all) with the ETA."""
        # the clock starts at the first logged step; the ETA is from the steps since
        if self.step0 is None:
            self.step0, self.t0 = step, time.time()
        done = step - self.step0
        eta = "?"
        if done > 0:
            eta = format_time((time.time() - self.t0) / done * (self.total - step))
        row = {"step": step, **{k: (float(v) if isinstance(v, (int, float)) else v)
                                for k, v in metrics.items()}}
        if not is_main():
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        for tracker in self.trackers:
            tracker(step, {k: v for k, v in row.items() if k != "step" and isinstance(v, float)})
        shown = " | ".join(f"{k} {_fmt(metrics[k])}" for k in (keys or metrics)
                           if k in metrics)
        print(f"step {step}/{self.total} | {shown} | eta {eta}", flush=True)


def open_tracker(name, out_dir, run_config):
    """A function (step, {name: number}) logging to Weights & Biases or TensorBoard, imported only
    when asked."""
    if dataclasses.is_dataclass(run_config):
        config = dataclasses.asdict(run_config)
    else:
        config = run_config or {}
    if name == "wandb":
        try:
            import wandb
        except ImportError:
            sys.exit("error: --log_to wandb needs the wandb package: pip install wandb (then "
                     "wandb login, or WANDB_MODE=offline)")
        name = f"{os.path.basename(os.path.abspath(out_dir))}-{time.strftime('%Y%m%d-%H%M%S')}"
        run = wandb.init(project=os.environ.get("WANDB_PROJECT", "instructgpt"), dir=out_dir,
                         config=config, name=name)
        return lambda step, values: run.log(values, step=step)
    if name == "tensorboard":
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            sys.exit("error: --log_to tensorboard needs the tensorboard package: "
                     "pip install tensorboard")
        writer = SummaryWriter(os.path.join(out_dir, "tensorboard"))
        writer.add_text("config", "    " + json.dumps(config, indent=2).replace("\n", "\n    "))

        def log(step, values):
            for k, v in values.items():
                writer.add_scalar(k, v, step)
            writer.flush()  # visible in TensorBoard at once, and nothing lost if the run is killed
        return log
    sys.exit(f"error: --log_to {name!r}: expected wandb, tensorboard, or both comma-separated "
             f"(default: off)")


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.3e}"
    return str(v)


def read_metrics(path):
    """The rows of a metrics.jsonl; a line torn by a killed run is skipped (and dropped when a
    resumed run rewrites the file)."""
    return read_jsonl(path, "metrics", {"step": int}, allow_empty=True, hint="")


# A plot takes about half a second on a CPU: a run redraws its PNG at an evaluation when this many
# seconds have passed since it last did, and always at its end (a short run's 15 evaluations would
# otherwise spend several seconds on plots nobody looks at before it ends).
REPLOT_SECONDS = 30.0


def replot_due(last_plot, final):
    """Redraw the run's PNG now? last_plot: time.time() of the previous drawing (-inf: none yet);
    final: this is the run's last evaluation."""
    return final or time.time() - last_plot >= REPLOT_SECONDS


def plot_metrics(metrics_path, png_path, panels, title=None, xlabel="step"):
    """One PNG with a panel per entry of `panels` ({panel title: [metric keys]}) against the rows'
    "step", with the x-axis labelled `xlabel`: what a step is ("iteration" for PPO, whose logged
    step is one rollout and its updates). Rank 0 only."""
    if not is_main():
        return png_path
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = read_metrics(metrics_path)
    n = len(panels)
    cols = min(n, 3)
    rows_of_panels = math.ceil(n / cols)
    fig, axes = plt.subplots(rows_of_panels, cols, figsize=(5 * cols, 3.4 * rows_of_panels),
                             squeeze=False)
    for ax, (name, keys) in zip(axes.flat, panels.items()):
        for k in keys:
            pts = [(r["step"], r[k]) for r in rows if isinstance(r.get(k), (int, float))]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, marker="o" if len(pts) < 30 else None, ms=3, label=k)
        ax.set_title(name)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
        if len(keys) > 1:
            ax.legend(fontsize=8)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    return save_figure(fig, png_path)


def save_figure(fig, png_path, layout=True):
    """Lay out a matplotlib figure (unless `layout` is False: the caller placed its parts) and write
    it atomically (temp file + rename), then free it."""
    import matplotlib.pyplot as plt
    if layout:
        fig.tight_layout()
    tmp = png_path + ".tmp.png"
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    fsync_replace(tmp, png_path)
    return png_path
