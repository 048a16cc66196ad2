"""eval.py: rebuilds the network from a checkpoint alone, plays games, prints scores, writes a video."""

import os
import subprocess
import sys

import cv2
import pytest

import eval as evaluation
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def pong_ckpt(tmp_path_factory):
    """A checkpoint of a short run with the smoke test's preset (atari-quick)."""
    runs = tmp_path_factory.mktemp("runs")
    run_dir = train.main(["--preset", "atari-quick", "--game", "Pong", "--training-steps", "2", "--last-steps", "0",
                          "--total-transitions", "64", "--eval-episodes", "1", "--runs-dir", str(runs)])
    return os.path.join(run_dir, "ckpt.pt")


def test_eval_cli_prints_every_game_and_the_normalized_score_and_writes_a_video(pong_ckpt, tmp_path):
    video = str(tmp_path / "game.mp4")
    proc = subprocess.run([sys.executable, "eval.py", "--ckpt", pong_ckpt, "--episodes", "2", "--num-simulations", "2",
                           "--max-episode-steps", "25", "--video", video], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "Pong" in out and "game  0 (seed 0): score" in out and "game  1 (seed 1): score" in out
    assert "mean" in out and "human-normalized" in out
    cap = cv2.VideoCapture(video)
    frames = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
    ok, frame = cap.read()
    assert ok and frame.shape == (384, 384, 3) and frames == 25     # the whole (capped) first game, 4x upscaled


def test_eval_is_reproducible_from_the_checkpoint_alone(pong_ckpt):
    args = ["--ckpt", pong_ckpt, "--episodes", "2", "--num-simulations", "3", "--max-episode-steps", "20"]
    first, second = evaluation.main(args), evaluation.main(args)
    assert first.shape == (2,) and (first == second).all()


def test_eval_errors_name_the_problem(tmp_path, pong_ckpt):
    with pytest.raises(train.UsageError, match="no checkpoint at"):
        evaluation.main(["--ckpt", str(tmp_path / "missing.pt")])
    with pytest.raises(train.UsageError, match="at least 1"):
        evaluation.main(["--ckpt", pong_ckpt, "--episodes", "0"])
    proc = subprocess.run([sys.executable, "eval.py", "--ckpt", str(tmp_path / "missing.pt")], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "eval.py: error: no checkpoint at" in proc.stderr
