"""eval.py: rebuilds the network from a checkpoint alone, plays games, prints scores, writes a video."""

import csv
import os
import subprocess
import sys

import imageio_ffmpeg
import pytest
import torch

import eval as evaluation
import train
from atari import make_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def pong_ckpt(tmp_path_factory):
    """A checkpoint of a short run with the smoke test's preset (atari-quick)."""
    runs = tmp_path_factory.mktemp("runs")
    run_dir = train.main(["--preset", "atari-quick", "--game", "Pong", "--training-steps", "2", "--last-steps", "0",
                          "--total-transitions", "64", "--eval-episodes", "1", "--runs-dir", str(runs)])
    return os.path.join(run_dir, "ckpt.pt")


def test_eval_cli_prints_every_game_and_the_normalized_score_and_writes_a_video(pong_ckpt, tmp_path):
    video, table = str(tmp_path / "game.mp4"), str(tmp_path / "eval.csv")
    proc = subprocess.run([sys.executable, "eval.py", "--ckpt", pong_ckpt, "--episodes", "2", "--num-simulations", "2",
                           "--max-episode-steps", "25", "--video", video, "--csv", table], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "game 1 of 2 over: game 0 (seed 0) scored" in out or "game 1 of 2 over: game 1 (seed 1) scored" in out
    assert "game 2 of 2 over" in out
    summary = next(line for line in out.splitlines() if line.startswith("Pong: mean "))
    assert all(w in summary for w in ("std", "min", "max", "over 2 games", "human-normalized"))
    rows = list(csv.DictReader(open(table)))
    assert len(rows) == 1 and rows[0]["source"] == "eval.py" and rows[0]["max_episode_steps"] == "25"
    reader = imageio_ffmpeg.read_frames(video)
    meta, frames = next(reader), list(reader)
    assert meta["codec"].startswith("h264") and meta["size"] == (384, 384)   # 4x upscaled, plays in a browser
    assert len(frames) == 25                                          # the whole (capped) first game


def test_eval_is_reproducible_from_the_checkpoint_alone(pong_ckpt):
    args = ["--ckpt", pong_ckpt, "--episodes", "2", "--num-simulations", "3", "--max-episode-steps", "20"]
    first, second = evaluation.main(args), evaluation.main(args)
    assert first.shape == (2,) and (first == second).all()


def test_a_gymnasium_task_keeps_its_own_time_limit(tmp_path):
    env = make_env("CartPole-v1", 1, 0, train=False, max_episode_steps=None)
    assert env.envs[0].spec.max_episode_steps == 500                 # CartPole-v1's own limit, not 27,000
    cfg = train.check_config(train.Config(**train.PRESETS["cartpole"]))
    train.save_checkpoint(str(tmp_path / "ckpt.pt"), train.checkpoint(train.build(cfg, env, torch.device("cpu")), cfg,
                                                                       env.reset()))
    env.close()
    evaluation.main(["--ckpt", str(tmp_path / "ckpt.pt"), "--episodes", "2", "--num-simulations", "2"])
    (row,) = csv.DictReader(open(tmp_path / "eval.csv"))             # beside the checkpoint by default
    assert row["max_episode_steps"] == "task" and row["human_normalized"] == "" and row["games"] == "2"


def test_depth_gap_probes_both_kinds_of_statistics_on_the_checkpoint_weights(pong_ckpt, capsys):
    ckpt = train.load_checkpoint(pong_ckpt)
    gaps = evaluation.depth_gap(ckpt, batches=2, batch_size=8)
    assert set(gaps) == {"depth", "shared"}
    for eval_mode, train_mode in gaps.values():
        assert eval_mode.shape == train_mode.shape == (2, 5) and torch.isfinite(eval_mode).all()
    evaluation.main(["--ckpt", pong_ckpt, "--depth-gap"])
    out = capsys.readouterr().out
    assert "depth  statistics, value prefix: eval" in out and "shared statistics, value       : eval" in out
    with pytest.raises(train.UsageError, match="needs the replay buffer"):
        evaluation.depth_gap({**ckpt, "buffer": None})
