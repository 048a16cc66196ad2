"""Bad input to train.py and eval.py: one line on stderr naming the problem and the fix, exit status 2, no
traceback, nothing written or overwritten. One table; each case runs the scripts' cli() in this process (a
subprocess per case would cost seconds each), and two cases run as real processes."""

import os
import subprocess
import sys

import pytest
import torch

import eval as evaluation
import train
from atari import make_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A finished CartPole run of 2 updates: seconds on a CPU.
TINY = ["--preset", "cartpole", "--num-envs", "2", "--num-simulations", "2", "--batch-size", "4",
        "--start-transitions", "40", "--td-steps", "10", "--total-transitions", "48", "--training-steps", "2",
        "--last-steps", "0", "--eval-episodes", "1", "--eval-max-episode-steps", "10"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A finished run's ckpt.pt and best.pt, and broken checkpoints beside them, in a directory of their own."""
    d = tmp_path_factory.mktemp("ckpts")
    run_dir = train.main(TINY + ["--runs-dir", str(d / "runs")])
    ckpt = os.path.join(run_dir, "ckpt.pt")
    data = open(ckpt, "rb").read()
    (d / "truncated.pt").write_bytes(data[: len(data) // 2])
    (d / "text.pt").write_bytes(b"not a checkpoint at all")
    torch.save({"state_dict": {"w": torch.zeros(2)}}, d / "foreign.pt")
    old = torch.load(ckpt, weights_only=False)
    del old["version"], old["kind"]                     # as written before the format version
    torch.save(old, d / "old.pt")
    (d / "afile").write_text("a file where a directory should be")
    (d / "folder.mp4").mkdir()
    cfg = train.check_config(train.Config(**train.PRESETS["atari-quick"], game="Pong"))   # untrained, for --video
    env = make_env(cfg.game, cfg.num_envs, 0)
    train.save_checkpoint(str(d / "pong.pt"), train.checkpoint(train.build(cfg, env, torch.device("cpu")), cfg,
                                                                 env.reset()))
    env.close()
    return dict(dir=str(d), ckpt=ckpt, best=os.path.join(run_dir, "best.pt"), pong=str(d / "pong.pt"))


# (script, arguments, a part of the message); {dir} {ckpt} {best} are the fixture's paths
CASES = [
    ("train", "--game MsPacmn", "unknown game 'MsPacmn': did you mean MsPacman"),
    ("train", "--game cartpole", "did you mean CartPole-v1"),
    ("train", "--game Pendulum-v1", "Pendulum-v1 has Box actions"),
    ("train", "--game FrozenLake-v1", "Discrete observations"),
    ("train", "--game LunarLander-v3", "LunarLander-v3 cannot be made here"),
    ("train", "--device cuda", "--device cuda: this machine has no usable CUDA device"),
    ("train", "--device tpu", "--device 'tpu' is not a device name"),
    ("train", "--device mps", "only cpu and cuda are supported"),
    ("train", "--search-backend triton", "--search-backend triton needs a CUDA device"),
    ("train", "--search-backend numpy", "use auto, torch, triton or numba"),
    ("train", "--channels 0", "--channels is 0; it must be at least 1"),
    ("train", "--support-size 0", "--support-size is 0; it must be at least 1"),
    ("train", "--torch-threads -1", "--torch-threads is -1; it must be 0 or more"),
    ("train", "--num-envs 0", "--num-envs is 0"),
    ("train", "--batch-size -3", "--batch-size is -3"),
    ("train", "--eval-episodes 0", "--eval-episodes is 0"),
    ("train", "--seed -1", "--seed is -1"),
    ("train", "--discount 1.5", "--discount is 1.5; it must be in (0, 1]"),
    ("train", "--lr-init 0", "--lr-init is 0.0; it must be in (0, inf)"),
    ("train", "--acting-temperature -1", "--acting-temperature is -1.0; it must be in [0, inf)"),
    ("train", "--reanalyze-ratio nan", "--reanalyze-ratio is nan"),
    ("train", "--bn-stats none", "--bn-stats 'none': use depth or shared"),
    ("train", "--game Pong --obs-norm", "--obs-norm is for vector observations"),
    ("train", "--exp-name a/b", "--exp-name 'a/b' names a directory"),
    ("train", "--start-transitions 200000", "learning could never start"),
    ("train", "--preset cartpole --batch-size 1000", "larger than the buffer can give"),
    ("train", "--replay-window -1", "--replay-window is -1; it must be 0 or more"),
    ("train", "--value-window -5", "--value-window is -5; it must be 0 or more"),
    ("train", "--preset cartpole --value-window 0", "with --value-window 0 add --window-td-steps 0"),
    ("train", "--preset cartpole --replay-window 255", "--replay-window 255 is smaller than --batch-size 256"),
    ("train", "--runs-dir {dir}/afile", "is a file, not a directory"),
    ("train", "--runs-dir {dir}/afile/runs", "is a file, not a directory"),
    ("train", "--runs-dir /sys/runs", "is not writable"),
    ("train", "--lr 0.1", "unrecognized arguments: --lr 0.1; did you mean --lr-init or --lr-warm-up (see train.py"),
    ("train", "--num_envs 2", "unrecognized arguments: --num_envs 2; did you mean --num-envs (see train.py --help)"),
    ("train", "--bogus 1", "unrecognized arguments: --bogus 1 (see train.py --help)"),  # no far-fetched guess
    ("train", "--channels many", "argument --channels: invalid int value: 'many'"),
    ("train", "--preset pong", "argument --preset: invalid choice: 'pong'"),
    ("train", "--resume {dir}/missing.pt", "no checkpoint at"),
    ("train", "--resume {dir}/truncated.pt", "is truncated or not a checkpoint"),
    ("train", "--resume {dir}/text.pt", "is truncated or not a checkpoint"),
    ("train", "--resume {dir}/foreign.pt", "is not a train.py checkpoint"),
    ("train", "--resume {dir}/old.pt", "older train.py (checkpoint format 1, now 2) and cannot be resumed"),
    ("train", "--resume {best}", "is the run's best evaluation"),
    ("train", "--resume {ckpt} --preset cartpole", "--preset with --resume"),
    ("train", "--resume {ckpt} --lr-init 0.1 --channels 8",
     "would change it: --lr-init 0.1 (the run's: 0.05), --channels 8 (the run's: 64)"),
    ("train", "--resume {ckpt} --game Pong", "--game Pong (the run's: CartPole-v1)"),
    ("train", "--resume {ckpt}", "is a finished run (2 updates"),
    ("train", "--resume {ckpt} --training-steps 4 --device cuda", "no usable CUDA device"),
    ("eval", "--ckpt {dir}/missing.pt", "no checkpoint at"),
    ("eval", "--ckpt {dir}/truncated.pt", "is truncated or not a checkpoint"),
    ("eval", "--ckpt {dir}/foreign.pt", "is not a train.py checkpoint"),
    ("eval", "--ckpt {ckpt} --episodes 0", "--episodes is 0; it must be at least 1"),
    ("eval", "--ckpt {ckpt} --max-episode-steps -5", "--max-episode-steps is -5"),
    ("eval", "--ckpt {ckpt} --seed -2", "--seed is -2"),
    ("eval", "--ckpt {ckpt} --device cuda", "no usable CUDA device"),
    ("eval", "--ckpt {ckpt} --video {dir}/game.mp4", "--video needs an Atari game; CartPole-v1"),
    ("eval", "--ckpt {pong} --video {dir}/nowhere/game.mp4", "the folder {dir}/nowhere does not exist"),
    ("eval", "--ckpt {pong} --video {dir}/game.avi", "the file name must end in .mp4"),
    ("eval", "--ckpt {pong} --video {dir}/folder.mp4", "cannot be written"),
    ("eval", "--ckpt {pong} --video /sys/game.mp4", "is not writable"),
    ("eval", "--ckpt {pong} --video {dir}/afile/game.mp4", "{dir}/afile is a file, not a folder"),
    ("eval", "--ckpt {ckpt} --csv {dir}/nowhere/eval.csv", "does not exist"),
    ("eval", "--ckpt {ckpt} --episode 3", "did you mean --episodes (see eval.py --help)"),
    ("eval", "--episodes 3", "the following arguments are required: --ckpt"),
]


def snapshot(folder):
    return {os.path.join(d, f): os.stat(os.path.join(d, f)).st_mtime_ns
            for d, _, names in os.walk(folder) for f in names}


@pytest.mark.parametrize("script, args, message", CASES, ids=[f"{s} {a}" for s, a, _ in CASES])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(script, args, message, files, capsys, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)     # the tests run under TRITON_INTERPRET=1
    monkeypatch.chdir(files["dir"])                          # a default runs/ would appear here
    argv = args.format(**files).split()
    before = snapshot(files["dir"])
    with pytest.raises(SystemExit) as exit_:
        (train if script == "train" else evaluation).cli(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2, err
    assert err.count("\n") == 1 and err.startswith(f"{script}.py: error: "), err
    assert message.format(**files) in err, err
    assert snapshot(files["dir"]) == before                  # nothing written or overwritten


def test_bad_input_from_a_real_process_has_no_traceback(tmp_path):
    for script, args in [("train.py", ["--game", "Breakot", "--runs-dir", str(tmp_path)]),
                         ("eval.py", ["--ckpt", str(tmp_path / "missing.pt")])]:
        proc = subprocess.run([sys.executable, script, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and proc.stdout == "", (proc.stdout, proc.stderr)
        assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert os.listdir(tmp_path) == []


def test_old_checkpoints_still_evaluate(files, tmp_path):
    scores = evaluation.main(["--ckpt", os.path.join(files["dir"], "old.pt"), "--episodes", "1",
                              "--num-simulations", "2", "--csv", str(tmp_path / "eval.csv")])
    assert scores.shape == (1,) and len(open(tmp_path / "eval.csv").read().splitlines()) == 2   # header, row


def test_search_backend_numba_needs_the_cpu_and_numba(monkeypatch):
    """check_backend alone: a CUDA device (not reachable from the command line on a CPU-only machine) and a
    machine without numba (find_spec answering None)."""
    import importlib.util

    from config import UsageError, check_backend
    check_backend("numba", torch.device("cpu")) if importlib.util.find_spec("numba") else None
    with pytest.raises(UsageError, match="numba runs on the CPU only, not on cuda"):
        check_backend("numba", torch.device("cuda"))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UsageError, match="numba is not installed; pip install numba, or use torch"):
        check_backend("numba", torch.device("cpu"))
