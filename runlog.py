"""What a run writes and prints, and how it stops: config.json (what ran), metrics.csv and eval.csv (with
headers), TensorBoard scalars, progress lines from the first seconds with the time left, the CPU estimate,
Ctrl-C / SIGTERM handling, the closing summary.

    runs/{game}__{exp_name}__{seed}__{unix time}/
        config.json     {"config": the Config the run started with, "run": device, search backend, commit,
                         versions, command; "resumes": [{"at": counters, "changed": flags, "run": ...}]}
        metrics.csv     one row every log_interval loop steps (env steps + updates)
        eval.csv        one row per evaluation: train.py's during the run, eval.py's final tests ("source")
        events.out.*    TensorBoard; every scalar is stepped by updates, so a resume can purge what a hard
                        kill left after its checkpoint (purge_step)
        ckpt.pt         the last checkpoint; best.pt the checkpoint of the best evaluation (train.py)
"""

import csv
import dataclasses
import importlib.metadata
import json
import math
import os
import platform
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
import torch
from torch.utils.tensorboard import SummaryWriter

from atari import ATARI_100K, human_normalized_score
from config import UsageError

LOSSES = ("value", "policy", "value_prefix", "consistency")
METRICS = ("env_steps", "updates", "time", "env_steps_per_s", "updates_per_s", *(f"loss_{n}" for n in LOSSES),
           "episode_return", "eval_return", "learning_rate", "td_horizon", "buffer_size")
EVAL_FIELDS = ("env_steps", "updates", "seconds", "mean", "std", "min", "max", "human_normalized", "games",
               "max_episode_steps", "simulations", "source", "scores")
# metrics.csv columns that are the step (updates), or have their own tag (per game, per evaluation)
NOT_IN_TENSORBOARD = ("updates", "time", "episode_return", "eval_return")


def hms(seconds):
    """1:02:03; 123 h past 100 hours; ? when unknown."""
    if seconds is None or not math.isfinite(seconds):
        return "?"
    if seconds >= 100 * 3600:
        return f"{seconds / 3600:,.0f} h"
    h, m, s = int(seconds // 3600), int(seconds % 3600 // 60), int(seconds % 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def plural(n, word):
    return f"{n:,} {word}{'' if n == 1 else 's'}"


class Ticker:
    """When a progress line is due: after 5 s, then at intervals growing to 60 s (a tenth of the time so far)."""

    def __init__(self):
        self.start = self.last = time.time()

    def due(self):
        now = time.time()
        if now - self.last >= min(60.0, max(5.0, 0.1 * (now - self.start))):
            self.last = now
            return True
        return False

    def printed(self):
        """Another line was just printed: the next progress line can wait."""
        self.last = time.time()


def check_writable_dir(path, what):
    """UsageError unless a directory can be made (or exists) at path and a file can be created in it. Writes
    nothing that stays: the test file is anonymous (O_TMPFILE-like TemporaryFile) in an existing ancestor."""
    path = os.path.abspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"{what} {path} is a file, not a directory; pass a directory")
    ancestor = path
    while not os.path.exists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
        raise UsageError(f"{what} {path}: {ancestor} is a file, not a directory; pass another directory")
    try:
        tempfile.TemporaryFile(dir=ancestor).close()
    except OSError as e:
        raise UsageError(f"{what} {path} is not writable ({e.strerror} in {ancestor}); pass a writable "
                         f"directory") from None


# ---------------------------------------------------------------------------------------------
# config.json: what actually ran
# ---------------------------------------------------------------------------------------------

def run_record(device, backend):
    """Where and with what code this run (or this resume) runs."""
    root = os.path.dirname(os.path.abspath(__file__))
    try:
        git = lambda *a: subprocess.run(["git", *a], cwd=root, capture_output=True, text=True, timeout=10).stdout.strip()
        commit = (git("rev-parse", "HEAD") or "unknown") + ("-dirty" if git("status", "--porcelain", "-uno") else "")
    except (OSError, subprocess.SubprocessError):
        commit = "unknown (no git)"
    versions = {"python": platform.python_version()}
    for package in ("torch", "triton", "numba", "ale-py", "gymnasium", "numpy"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())
    return dict(time=time.strftime("%Y-%m-%d %H:%M:%S %z"), command=" ".join(sys.argv), device=str(device),
                device_name=name, cpu_count=os.cpu_count(), search_backend=backend, commit=commit, versions=versions)


def write_config_json(run_dir, cfg, record, resumed_at=None, changed=None):
    """A new run writes {"config", "run", "resumes": []}; a resume appends to "resumes" and keeps the rest, so the
    file never shows a configuration other than the one the run started with."""
    path = os.path.join(run_dir, "config.json")
    if resumed_at is not None and os.path.exists(path):
        with open(path) as f:
            data = json.load(f)
        at = {k: v if not isinstance(v, float) or math.isfinite(v) else None for k, v in resumed_at.items()}  # JSON
        data.setdefault("resumes", []).append(dict(at=at, changed=changed, run=record))
    else:
        data = dict(config=dataclasses.asdict(cfg), run=record, resumes=[])
    with open(path + ".tmp", "w") as f:
        json.dump(data, f, indent=2, allow_nan=False)
    os.replace(path + ".tmp", path)


# ---------------------------------------------------------------------------------------------
# csv files
# ---------------------------------------------------------------------------------------------

def append_csv(path, fields, row):
    """Append one row (a dict) to a csv file, writing the header first when the file is new."""
    new = not os.path.exists(path) or os.path.getsize(path) == 0
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fields)
        if new:
            writer.writeheader()
        writer.writerow({k: f"{v:.6g}" if isinstance(v, float) else v for k, v in row.items()})


def trim_csv(path, keep):
    """Drop the rows for which keep(row) is false: what a hard-killed run logged after its last checkpoint, which
    the resumed run logs again. Rewritten atomically; -> rows dropped."""
    if not os.path.exists(path):
        return 0
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        fields, rows = reader.fieldnames, list(reader)
    kept = [r for r in rows if keep(r)]
    if len(kept) < len(rows):
        with open(path + ".tmp", "w", newline="") as f:
            writer = csv.DictWriter(f, fields)
            writer.writeheader()
            writer.writerows(kept)
        os.replace(path + ".tmp", path)
    return len(rows) - len(kept)


def eval_row(scores, env_steps, updates, seconds, game, max_episode_steps, simulations, source):
    """One eval.csv row: the statistics of a set of game scores."""
    hns = human_normalized_score(game, scores.mean()) if game in ATARI_100K else ""
    return dict(env_steps=env_steps, updates=updates, seconds=round(seconds, 1), mean=float(scores.mean()),
                std=float(scores.std()), min=float(scores.min()), max=float(scores.max()), human_normalized=hns,
                games=len(scores), max_episode_steps=max_episode_steps, simulations=simulations, source=source,
                scores=" ".join(f"{s:g}" for s in scores))


class Interval:
    """What happens between two metrics rows: the updates' losses and TD horizons (device tensors, summed with no
    host sync), the scores of the games that ended, the rates."""

    def __init__(self, st, device):
        self.zeros = lambda: (torch.zeros(4, device=device), torch.zeros((), device=device), 0, [])
        self.start(st)

    def start(self, st):
        self.t, self.env_steps, self.updates = time.time(), st.env_steps, st.updates
        self.loss_sum, self.td_sum, self.num_updates, self.returns = self.zeros()

    def add(self, losses, horizon):
        self.loss_sum, self.td_sum = self.loss_sum + losses, self.td_sum + horizon
        self.num_updates += 1

    def row(self, st, learning_rate, elapsed):
        """-> the metrics.csv row of the interval that ends now; starts the next one."""
        dt, n = max(time.time() - self.t, 1e-9), max(self.num_updates, 1)
        row = dict(env_steps=st.env_steps, updates=st.updates, time=round(elapsed, 1),
                   env_steps_per_s=(st.env_steps - self.env_steps) / dt, updates_per_s=(st.updates - self.updates) / dt,
                   episode_return=float(np.mean(self.returns)) if self.returns else float("nan"),
                   eval_return=st.last_eval, learning_rate=learning_rate, buffer_size=len(st.buf),
                   td_horizon=(self.td_sum / n).item())                                          # sync point
        row.update({f"loss_{k}": v for k, v in zip(LOSSES, (self.loss_sum / n).tolist())})
        self.start(st)
        return row


class RunLog:
    """The run directory's metrics.csv, eval.csv and TensorBoard writer. A resumed run first drops the rows
    and events past its checkpoint (after a hard kill), so no row is written twice."""

    def __init__(self, run_dir, cfg, resumed=None):
        self.run_dir = run_dir
        self.metrics_path, self.eval_path = os.path.join(run_dir, "metrics.csv"), os.path.join(run_dir, "eval.csv")
        if resumed:  # counters of the checkpoint
            u, e = resumed["updates"], resumed["env_steps"]
            trim_csv(self.metrics_path, lambda r: int(r["updates"]) <= u and int(r["env_steps"]) <= e)
            trim_csv(self.eval_path, lambda r: r["source"] != "train.py" or int(r["updates"]) <= u)
        self.writer = SummaryWriter(run_dir, purge_step=resumed["updates"] + 1 if resumed else None)
        self.tensorboard_step = resumed["updates"] if resumed else -1
        if not resumed:
            self.writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" +
                                 "\n".join(f"|{k}|{v}|" for k, v in dataclasses.asdict(cfg).items()))

    def metrics(self, row, left, evals):
        """A metrics.csv row; its numbers as TensorBoard scalars charts/* and losses/* at step row["updates"];
        the progress line (nanoGPT style) with the time left."""
        append_csv(self.metrics_path, METRICS, row)
        for k, v in row.items():  # one point per update count: rows of the random warm-up all have update 0
            if k not in NOT_IN_TENSORBOARD and isinstance(v, (int, float)) and math.isfinite(v) \
                    and row["updates"] > self.tensorboard_step:
                self.writer.add_scalar(("losses/" if k.startswith("loss_") else "charts/") + k, v, row["updates"])
        self.tensorboard_step = row["updates"]
        ret, ev = ("-" if np.isnan(row[k]) else f"{row[k]:.1f}" for k in ("episode_return", "eval_return"))
        print(f"env {row['env_steps']:,} | upd {row['updates']:,} | {row['env_steps_per_s']:.1f} env/s "
              f"{row['updates_per_s']:.2f} upd/s | loss v {row['loss_value']:.3f} p {row['loss_policy']:.3f} "
              f"r {row['loss_value_prefix']:.3f} c {row['loss_consistency']:.3f} | return {ret} | "
              f"eval {ev} | lr {row['learning_rate']:.4f} | td {row['td_horizon']:.2f} | "
              f"buf {row['buffer_size']:,} | left {hms(left)} ({evals})", flush=True)

    def episode(self, score, updates):
        self.writer.add_scalar("charts/episodic_return", score, updates)

    def evaluation(self, row):
        append_csv(self.eval_path, EVAL_FIELDS, row)
        self.writer.add_scalar("eval/mean_return", row["mean"], row["updates"])
        if row["human_normalized"] != "":
            self.writer.add_scalar("eval/human_normalized", row["human_normalized"], row["updates"])

    def close(self):
        self.writer.close()


# ---------------------------------------------------------------------------------------------
# Progress, stop, summary
# ---------------------------------------------------------------------------------------------

class Stop:
    """Ctrl-C or SIGTERM: the first asks the loop to stop after the current step (checkpoint, resume command,
    exit 0); a second aborts at once (KeyboardInterrupt). Handlers only in the main thread."""

    def __init__(self):
        self.requested, self.previous = None, {}
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}

    def handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name
        os.write(1, f"\n{self.requested}: stopping after this step, then writing a checkpoint "
                    f"(Ctrl-C again aborts at once)\n".encode())

    def close(self):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def evaluations_left(st, cfg):
    """Evaluation points still to come: every eval_interval updates and at the end (and now, if one is due)."""
    total, u, every = cfg.training_steps + cfg.last_steps, st.updates, cfg.eval_interval
    due_now = u > 0 and (u % every == 0 or u == total) and st.eval_updates != u
    return total // every - u // every + (total % every > 0) - (u == total) + due_now


class Pace:
    """Wall time per update (evaluations left out) and per evaluation in this process -> the time left."""

    def __init__(self, st):
        self.start, self.env_steps0, self.eval_seconds = time.time(), st.env_steps, []
        self.learn_start = self.learn_updates = self.learn_evals = None

    def left(self, st, cfg):
        """-> (seconds left or None, a note on the evaluations that are left)."""
        total, evals = cfg.training_steps + cfg.last_steps, evaluations_left(st, cfg)
        if self.learn_start is None or st.updates <= self.learn_updates:
            return None, plural(evals, "evaluation")
        learn = time.time() - self.learn_start - sum(self.eval_seconds[self.learn_evals:])
        left = (total - st.updates) * learn / (st.updates - self.learn_updates)
        if not self.eval_seconds:
            return left, f"+ {plural(evals, 'evaluation')} not yet timed"
        return left + evals * np.mean(self.eval_seconds), f"{plural(evals, 'evaluation')} included"

    def learning(self, st):
        if self.learn_start is None:  # from the first update on (its one-off costs left out)
            self.learn_start, self.learn_updates, self.learn_evals = time.time(), st.updates, len(self.eval_seconds)


def progress_line(st, cfg, pace):
    """A short line between the logged ones: random warm-up n of N, or learning with the time left."""
    if st.updates == 0:
        rate = (st.env_steps - pace.env_steps0) / max(time.time() - pace.start, 1e-9)
        left = (cfg.start_transitions - len(st.buf)) / rate if rate > 0 else None
        print(f"warm-up (random play): {len(st.buf):,} of {cfg.start_transitions:,} transitions, {rate:.1f} env "
              f"steps/s, {hms(left)} left", flush=True)
    else:
        left, evals = pace.left(st, cfg)
        print(f"update {st.updates:,} of {cfg.training_steps + cfg.last_steps:,}, env step {st.env_steps:,} of "
              f"{cfg.total_transitions:,}, " + (f"last eval {st.last_eval:.1f}" if math.isfinite(st.last_eval) else
              "no eval yet") + f", {hms(left)} left ({evals})", flush=True)


def summary(st, cfg, run_dir, seconds):
    """The closing line: final and best evaluation, env steps, updates, wall time, where the files are."""
    def score(mean):
        if not np.isfinite(mean):
            return "none"
        return f"{mean:.1f}" + (f" (human-normalized {human_normalized_score(cfg.game, mean):.3f})"
                                if cfg.game in ATARI_100K else "")
    files = " ".join(f for f in ("ckpt.pt", "best.pt", "eval.csv", "metrics.csv", "config.json")
                     if os.path.exists(os.path.join(run_dir, f)))
    return (f"done: {cfg.game}, final eval {score(st.last_eval)}, best {score(st.best_eval)} at update "
            f"{st.best_updates:,}; {st.env_steps:,} env steps, {st.updates:,} updates, {hms(st.elapsed)} "
            f"({hms(seconds)} in this process); files in {run_dir}: {files}, TensorBoard events "
            f"(tensorboard --logdir {os.path.dirname(run_dir) or '.'})")


def estimate(cfg, st, step_s, update_s, seconds):
    """The time the rest of a run takes at a measured pace; over an hour on a CPU, the presets made for one."""
    total = cfg.training_steps + cfg.last_steps
    steps_left = max(0, cfg.total_transitions - st.env_steps)
    run_s = (total - st.updates) * update_s + steps_left // cfg.num_envs * step_s
    evals = evaluations_left(st, cfg)
    eval_s = evals * cfg.eval_max_episode_steps * step_s * max(1.0, cfg.eval_episodes / cfg.num_envs)  # capped games
    line = (f"on this CPU: {update_s:.3g} s per update, {step_s:.3g} s per self-play step, so about {hms(run_s)} for "
            f"the {total - st.updates:,} updates and {steps_left:,} env steps left, plus "
            f"{plural(evals, 'evaluation')} (at most {hms(eval_s)}); measured in {seconds:.0f} s")
    if run_s > 3600:
        line += (f"\nthat is too long for a CPU: this configuration is for a GPU. On a CPU use --preset cartpole "
                 f"(CartPole-v1, minutes) or --preset atari-quick --game {cfg.game} (a tiny network through the whole "
                 f"Atari path); see README \"CPU and GPU\"")
    return line


def stopped(st, cfg, signal_name, ckpt_path, seconds):
    """The lines after a stop request: where the checkpoint is, what it holds, the command that resumes."""
    return (f"stopped by {signal_name} at update {st.updates:,}, env step {st.env_steps:,}: {ckpt_path} written "
            f"({os.path.getsize(ckpt_path) / 2 ** 20:,.0f} MiB, {'with' if cfg.save_buffer else 'without'} the replay "
            f"buffer, {seconds:.1f} s)\nresume with: python train.py --resume {shlex.quote(ckpt_path)}")
