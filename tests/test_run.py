"""A run a user can trust: Ctrl-C / SIGTERM stop with a checkpoint and a resume command, the resumed run goes on
at the same pace without losing or repeating data, checkpoints are written atomically, progress and summary."""

import csv
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import runlog
import train
from config import Config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# CartPole with a tiny search and batch: 150 updates and 150 env steps in a few seconds.
RUN = ["--preset", "cartpole", "--num-envs", "2", "--num-simulations", "2", "--batch-size", "8",
       "--start-transitions", "40", "--td-steps", "10", "--total-transitions", "150", "--training-steps", "150",
       "--last-steps", "0", "--eval-interval", "50", "--eval-episodes", "2", "--eval-max-episode-steps", "20",
       "--log-interval", "10", "--save-interval", "50"]


def run_until(args, stop_signal, after_updates, timeout=120):
    """Start train.py; once a progress line shows `after_updates` updates, send stop_signal. -> (stdout, rc)."""
    proc = subprocess.Popen([sys.executable, "train.py", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    lines, deadline = [], time.time() + timeout
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("env ") and int(line.split("| upd ")[1].split(" ")[0].replace(",", "")) >= after_updates:
            proc.send_signal(stop_signal)
            break
        assert time.time() < deadline, "".join(lines)
    out, err = proc.communicate(timeout=timeout)
    return "".join(lines) + out, proc.returncode, err


def rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_interrupt_and_resume_twice_loses_and_repeats_nothing(tmp_path):
    out, rc, err = run_until(RUN + ["--runs-dir", str(tmp_path)], signal.SIGINT, after_updates=30)
    assert rc == 0, out + err
    assert "SIGINT: stopping after this step" in out and "stopped by SIGINT at update" in out, out
    resume_cmd = out.strip().splitlines()[-1]
    assert resume_cmd.startswith("resume with: python train.py --resume "), out
    ckpt_path = resume_cmd.split("--resume ")[1]
    (run,) = os.listdir(tmp_path)
    assert ckpt_path == os.path.join(str(tmp_path), run, "ckpt.pt")
    first = torch.load(ckpt_path, weights_only=False)
    c1 = first["counters"]
    assert c1["updates"] >= 30 and len(first["buffer"]["actions"]) == c1["env_steps"]   # the whole buffer is saved
    assert c1["env_steps"] <= 40 + c1["updates"] + 2                  # on pace: 1 env step per update after 40

    # SIGTERM (a scheduler) on the resumed run, after the evaluation at update 50
    out, rc, err = run_until(["--resume", ckpt_path, "--log-interval", "6"], signal.SIGTERM, after_updates=70)
    assert rc == 0 and "resumed" in out and "stopped by SIGTERM" in out, out + err
    second = torch.load(ckpt_path, weights_only=False)
    c2 = second["counters"]
    assert c2["updates"] >= 70 and c2["env_steps"] > c1["env_steps"]
    assert len(second["buffer"]["actions"]) == c2["env_steps"]        # nothing lost across the first stop
    assert np.array_equal(second["buffer"]["actions"][:c1["env_steps"]], first["buffer"]["actions"])

    # the last resume extends the budget (allowed) and runs to the end
    proc = subprocess.run([sys.executable, "train.py", "--resume", ckpt_path, "--training-steps", "160"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip().splitlines()[-1].startswith("done: CartPole-v1, final eval ")
    final = torch.load(ckpt_path, weights_only=False)
    assert final["counters"]["updates"] == 160 and final["counters"]["env_steps"] == 150     # the whole budget
    assert len(final["buffer"]["actions"]) == 150

    run_dir = os.path.dirname(ckpt_path)
    metrics = [(int(r["env_steps"]), int(r["updates"])) for r in rows(os.path.join(run_dir, "metrics.csv"))]
    assert len(metrics) == len(set(metrics)) and metrics == sorted(metrics)              # no row twice
    evals = [int(r["updates"]) for r in rows(os.path.join(run_dir, "eval.csv"))]
    assert evals == [50, 100, 150, 160]                               # each evaluation once, none lost
    print(f"stops at update {c1['updates']} / env step {c1['env_steps']} (SIGINT) and update {c2['updates']} / env step "
          f"{c2['env_steps']} (SIGTERM); the end at update 160 / env step 150, buffer 150; {len(metrics)} metrics rows, "
          f"evaluations at {evals}")
    config = json.load(open(os.path.join(run_dir, "config.json")))
    assert config["config"]["training_steps"] == 150                  # the configuration the run started with
    assert [r["changed"] for r in config["resumes"]] == [{"log_interval": 6}, {"training_steps": 160}]
    assert config["run"]["device"] == "cpu" and config["run"]["versions"]["torch"] == torch.__version__
    assert {"ckpt.pt", "best.pt"} <= set(os.listdir(run_dir)) and not any(f.endswith(".tmp") for f in os.listdir(run_dir))
    events = EventAccumulator(run_dir)
    events.Reload()
    tags = set(events.Tags()["scalars"])                              # one tag per quantity, none twice over
    assert tags == {"charts/episodic_return", "eval/mean_return", *(f"charts/{k}" for k in ("env_steps",
                    "env_steps_per_s", "updates_per_s", "learning_rate", "td_horizon", "buffer_size")),
                    *(f"losses/loss_{k}" for k in train.LOSSES)}, tags
    for tag in tags - {"charts/episodic_return"}:                     # across three processes, no step twice
        steps = [e.step for e in events.Scalars(tag)]
        assert steps == sorted(set(steps)), (tag, steps)


def test_a_second_ctrl_c_aborts_at_once():
    previous = signal.getsignal(signal.SIGINT)
    stop = runlog.Stop()
    try:
        stop.handle(signal.SIGINT, None)
        assert stop.requested == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            stop.handle(signal.SIGINT, None)
    finally:
        stop.close()
    assert signal.getsignal(signal.SIGINT) is previous


def test_a_failed_checkpoint_write_leaves_the_previous_one_intact(tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt.pt")
    train.save_checkpoint(path, {"step": 1})

    def dies_halfway(obj, f):
        open(f, "wb").write(b"half a checkpoint")
        raise KeyboardInterrupt                                       # the second Ctrl-C during the write

    monkeypatch.setattr(torch, "save", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        train.save_checkpoint(path, {"step": 2})
    monkeypatch.undo()
    assert torch.load(path) == {"step": 1} and os.listdir(tmp_path) == ["ckpt.pt"]


def test_time_left_counts_the_evaluations():
    cfg = Config(training_steps=1_000, last_steps=500, eval_interval=400)
    st = train.argparse.Namespace(updates=0, env_steps=0, eval_updates=-1, elapsed=0.0)
    assert runlog.evaluations_left(st, cfg) == 4                      # at 400, 800, 1200 and the end (1500)
    st.updates = 800
    assert runlog.evaluations_left(st, cfg) == 3                      # the one due now, 1200, 1500
    st.eval_updates = 800
    assert runlog.evaluations_left(st, cfg) == 2
    pace = runlog.Pace(st)
    pace.learning(st)
    pace.learn_start -= 130.0                                         # 100 s for 200 updates ...
    pace.eval_seconds = [10.0, 20.0]                                  # ... besides evaluations of 15 s on average
    st.updates = 1_000
    left, note = pace.left(st, cfg)
    assert left == pytest.approx(500 * 0.5 + 2 * 15, rel=0.01) and note == "2 evaluations included"
    assert runlog.hms(3725) == "1:02:05" and runlog.hms(65) == "1:05" and runlog.hms(float("nan")) == "?"
