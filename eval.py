"""Evaluate a train.py checkpoint with the paper's protocol (EZ_SPEC §7.1).

    python eval.py --ckpt runs/<run>/ckpt.pt                      # 32 full games, the final test
    python eval.py --ckpt runs/<run>/best.pt --video game.mp4     # the best evaluation's weights, and an H.264 mp4

The network is rebuilt from the checkpoint alone (its model_args and config). Defaults are the final
test of the paper: 32 games with env seeds 0..31, whole games (no episodic life), up to 30 no-op starts,
a 27,000-step (108k-frame) cap on Atari (a gymnasium task keeps its own limit: 500 for CartPole-v1),
the argmax of a 50-simulation search without root noise, raw scores. Prints each game as it ends, then
one line: mean, std, min, max and, on Atari, the human-normalized score of the mean; appends a row to
the run's eval.csv (source "eval.py").
"""

import dataclasses
import os
import sys
import time

import numpy as np
import torch

from atari import ALE_GAMES, ATARI_100K, make_env
from config import Config, Parser, UsageError, check_backend, check_device, load_checkpoint
from mcts import run_search, select_action
from model import make_model
from replay import ReplayBuffer
from runlog import EVAL_FIELDS, Ticker, append_csv, check_writable_dir, eval_row, hms


def evaluate(model, cfg, episodes, seed, max_episode_steps, num_simulations, frame_fn=None, progress=None,
             stop=None):
    """Play `episodes` games in parallel with the argmax of a no-noise search (EZ_SPEC §7.1).
    -> raw scores [episodes], lengths [episodes]; (None, None) when stop() turned true first.
    frame_fn(obs) sees every observation of game 0; progress(step, scores) is called after every step
    (scores NaN for the games still playing). max_episode_steps None: the gymnasium task's own limit."""
    env = make_env(cfg.game, episodes, seed, train=False, max_episode_steps=max_episode_steps)
    generator = torch.Generator(next(model.parameters()).device).manual_seed(seed)
    was_training, tree = model.training, None
    model.eval()
    scores, lengths = np.full(episodes, np.nan), np.zeros(episodes, np.int64)
    obs, step = env.reset(), 0
    while np.isnan(scores).any():  # games that ended keep playing (one batch shape); only the first game counts
        if stop is not None and stop():
            scores = lengths = None
            break
        result = run_search(model, obs, cfg, num_simulations, False, generator, tree)
        tree = result.tree
        actions = select_action(result.visit_counts, 1.0, generator, deterministic=True).cpu().numpy()  # sync point
        if frame_fn is not None and np.isnan(scores[0]):
            frame_fn(obs[0])
        obs, _, _, info = env.step(actions)
        over = info["game_over"] & np.isnan(scores)
        scores[over], lengths[over] = info["episode_return"][over], info["episode_length"][over]
        step += 1
        if progress is not None:
            progress(step, scores)
    env.close()
    model.train(was_training)
    return scores, lengths


def evaluate_and_log(st, cfg, log, pace, stop):
    """train.py's evaluation of the learner's network (cfg's games, cap and simulations) with progress lines while
    it plays, a row in eval.csv, st.last_eval. -> False when a stop request cut it short."""
    ticker, t0 = Ticker(), time.time()

    def progress(step, scores):
        if ticker.due():
            print(f"evaluation at update {st.updates:,}: {np.count_nonzero(~np.isnan(scores))} of {len(scores)} "
                  f"games over, step {step:,} of at most {cfg.eval_max_episode_steps:,}", flush=True)

    scores, _ = evaluate(st.model, cfg, cfg.eval_episodes, cfg.seed + cfg.num_envs, cfg.eval_max_episode_steps,
                         cfg.num_simulations, progress=progress, stop=lambda: stop.requested)
    if scores is None:
        return False
    pace.eval_seconds.append(time.time() - t0)
    row = eval_row(scores, st.env_steps, st.updates, st.elapsed + time.time() - t0, cfg.game,
                   cfg.eval_max_episode_steps, cfg.num_simulations, "train.py")
    log.evaluation(row)
    st.last_eval, st.eval_updates = row["mean"], st.updates
    hns = f", human-normalized {row['human_normalized']:.3f}" if row["human_normalized"] != "" else ""
    print(f"eval at update {st.updates:,}, env step {st.env_steps:,}: {row['mean']:.1f} +- {row['std']:.1f} over "
          f"{len(scores)} games{hns} ({hms(pace.eval_seconds[-1])})", flush=True)
    return True


class VideoWriter:
    """H.264 mp4 (yuv420p, plays in browsers) of the newest RGB frame of each observation [12, 96, 96] uint8,
    scaled 4x, through imageio-ffmpeg (which ships an ffmpeg with libx264). check() reads the file back."""

    def __init__(self, path, scale=4, fps=15):
        import imageio_ffmpeg
        self.path, self.scale, self.frames, self.error = path, scale, 0, None
        size = (96 * scale, 96 * scale)
        self.writer = imageio_ffmpeg.write_frames(path, size, fps=fps, codec="libx264", pix_fmt_in="rgb24",
                                                  pix_fmt_out="yuv420p", macro_block_size=16, ffmpeg_log_level="error",
                                                  output_params=["-movflags", "+faststart"])
        self.writer.send(None)  # starts ffmpeg

    def __call__(self, obs):
        frame = obs[-3:].transpose(1, 2, 0).repeat(self.scale, 0).repeat(self.scale, 1)   # [384, 384, 3] RGB
        if self.error is None:
            try:
                self.writer.send(np.ascontiguousarray(frame))
                self.frames += 1
            except Exception as e:  # ffmpeg died (disk full, path removed): reported by check()
                self.error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"

    def check(self):
        """Close the file; -> None if it holds `frames` H.264 frames, else what is wrong."""
        import imageio_ffmpeg
        try:
            self.writer.close()
        except Exception as e:
            self.error = self.error or f"{type(e).__name__}: {e}"
        if self.error:
            return self.error
        if not os.path.isfile(self.path) or os.path.getsize(self.path) == 0:
            return "no file was written"
        try:
            reader = imageio_ffmpeg.read_frames(self.path)
            codec = next(reader)["codec"]
            reader.close()
            frames, _ = imageio_ffmpeg.count_frames_and_secs(self.path)
        except Exception as e:
            return f"it cannot be read back ({type(e).__name__}: {e})"
        if not codec.startswith("h264") or frames != self.frames:
            return f"it holds {frames} frames of {codec}, expected {self.frames} frames of h264"
        return None


# ---------------------------------------------------------------------------------------------
# The BatchNorm probe: does inference at depth d see what the learner's unroll saw? (README "Differences")
# ---------------------------------------------------------------------------------------------

def unroll_predictions(model, batch, K):
    """Mean predicted value prefix and value at unroll depths 1..K of a replay batch -> [2, K] (train mode: each
    depth normalized with the batch's own statistics, as the learner; eval mode: the running statistics)."""
    out = model.initial_inference(batch.obs[:, 0])
    latent, lstm, means = out.latent, out.lstm_state, []
    for k in range(1, K + 1):
        step = model.recurrent_inference(latent, lstm, batch.actions[:, k - 1], k)
        latent, lstm = step.latent, step.lstm_state
        means.append(torch.stack([step.value_prefix.mean(), step.value.mean()]))
    return torch.stack(means, 1)


@torch.no_grad()
def depth_gap(ckpt, batches=60, batch_size=256, seed=0):
    """The checkpoint's weights with per-depth and with shared BatchNorm statistics, both refreshed by train-mode
    unroll passes over `batches` replay batches (momentum 0.1: the old statistics weigh 0.9^60 = 0.2%), then
    eval-mode vs train-mode predictions per depth on one more batch. -> {"depth"|"shared": (eval [2, K], train)}"""
    if ckpt.get("buffer") is None:
        raise UsageError("--depth-gap needs the replay buffer in the checkpoint: use a ckpt.pt saved with --save-buffer")
    state, cfg = ckpt["buffer"], Config(**{k: v for k, v in ckpt["config"].items() if k in Config.__dataclass_fields__})
    K = cfg.num_unroll_steps
    buf = ReplayBuffer(int(state["size"]), int(state["num_envs"]), state["frame_shape"], int(state["stack"]),
                       int(state["num_actions"]), cfg.priority_alpha, state["frames"].dtype)
    buf.load_state_dict(state)
    generator = torch.Generator().manual_seed(seed)
    batch_size = min(batch_size, buf.num_sampleable(K, cfg.td_steps))
    sample = lambda: buf.sample(batch_size, K, cfg.td_steps, 1.0, generator)
    weights = {k: v for k, v in ckpt["model"].items() if "running_" not in k and "num_batches" not in k}
    result = {}
    for mode, bn_depths in (("depth", K + 1), ("shared", 1)):
        model = make_model(**{**ckpt["model_args"], "bn_depths": bn_depths})
        model.load_state_dict(weights, strict=False)
        model.train()
        for _ in range(batches):
            unroll_predictions(model, sample(), K)
        probe = sample()
        train_mode = unroll_predictions(model, probe, K)
        result[mode] = (unroll_predictions(model.eval(), probe, K), train_mode)
    return result


def check_output_file(path, flag, suffix):
    """UsageError unless path ends in suffix and its folder exists and can be written to (checked before the
    games are played, so a bad path costs no time and leaves nothing behind)."""
    folder = os.path.dirname(os.path.abspath(path))
    if not path.lower().endswith(suffix):
        raise UsageError(f"{flag} {path}: the file name must end in {suffix}")
    if not os.path.isdir(folder):
        problem = "is a file, not a folder" if os.path.exists(folder) else "does not exist"
        raise UsageError(f"{flag} {path}: the folder {folder} {problem}; create it or pick another path")
    if os.path.isdir(path) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise UsageError(f"{flag} {path} cannot be written; pick another path")
    check_writable_dir(folder, flag + " folder")


def main(argv=None):
    p = Parser(prog="eval.py", description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--ckpt", required=True, help="ckpt.pt or best.pt of a train.py run (or its run directory)")
    p.add_argument("--episodes", type=int, metavar="N", default=32,
                   help="games, played in parallel (EZ_SPEC §7.1: 32)")
    p.add_argument("--num-simulations", type=int, metavar="N", default=50,
                   help="search simulations per move (EZ_SPEC §7.1: 50)")
    p.add_argument("--max-episode-steps", type=int, metavar="N", default=None,
                   help="agent-step cap per game; default 27,000 (108k frames) on Atari, the task's own on gymnasium")
    p.add_argument("--seed", type=int, metavar="N", default=0, help="game j is seeded seed + j (EZ_SPEC §7.1: 0..31)")
    p.add_argument("--device", default="auto", metavar="NAME", help='"auto" = cuda when available, else cpu')
    p.add_argument("--search-backend", default="auto", metavar="NAME",
                   help='"torch", "triton", "numba" or "auto" (triton on CUDA, else numba if installed)')
    p.add_argument("--video", metavar="OUT.mp4", help="write an H.264 mp4 of the first game (Atari only)")
    p.add_argument("--csv", metavar="EVAL.csv", help="append the result here (default: the run's eval.csv)")
    p.add_argument("--depth-gap", action="store_true",
                   help="instead of games: eval-mode vs train-mode predictions per unroll depth on replay batches, with "
                        "per-depth and with shared BatchNorm statistics on the checkpoint's weights (needs its buffer)")
    args = p.parse_args(argv)
    for name in ("episodes", "num_simulations", "max_episode_steps"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} is {getattr(args, name)}; it must be at least 1")
    if not 0 <= args.seed < 2 ** 31 - args.episodes:
        raise UsageError(f"--seed is {args.seed}; it must be 0 or more and below 2^31 - episodes")
    device = check_device(args.device)
    check_backend(args.search_backend, device)
    ckpt = load_checkpoint(args.ckpt)
    ckpt_path = os.path.join(args.ckpt, "ckpt.pt") if os.path.isdir(args.ckpt) else args.ckpt
    cfg = Config(**{k: v for k, v in ckpt["config"].items() if k in {f.name for f in dataclasses.fields(Config)}})
    cfg.search_backend = args.search_backend
    if cfg.torch_threads:                                       # the run's choice (1 for the CPU presets)
        torch.set_num_threads(cfg.torch_threads)
    atari = cfg.game in ALE_GAMES
    max_steps = args.max_episode_steps or (27_000 if atari else None)
    csv_path = args.csv or os.path.join(os.path.dirname(os.path.abspath(ckpt_path)), "eval.csv")
    check_output_file(csv_path, "--csv", ".csv")
    if args.video:
        if not atari:
            raise UsageError(f"--video needs an Atari game; {cfg.game} has vector observations")
        check_output_file(args.video, "--video", ".mp4")

    if args.depth_gap:
        print(f"{cfg.game}: {ckpt_path}, update {ckpt['counters']['updates']:,}: mean value prefix and value per unroll "
              f"depth 1..{cfg.num_unroll_steps} of a replay batch, eval mode vs train mode (the learner's)")
        for mode, (eval_mode, train_mode) in depth_gap(ckpt).items():
            for i, name in enumerate(("value prefix", "value")):
                row = lambda x: " ".join(f"{v:7.2f}" for v in x[i].tolist())
                print(f"{mode:6s} statistics, {name:12s}: eval {row(eval_mode)} | train {row(train_mode)} | "
                      f"gap {row((eval_mode - train_mode).abs())}")
        return None
    model = make_model(**ckpt["model_args"])
    model.load_state_dict(ckpt["model"])                       # the final weights, as the paper (EZ_SPEC §7.1)
    model.to(device).eval()
    video = VideoWriter(args.video) if args.video else None
    counters = ckpt["counters"]
    cap = f"cap {max_steps:,} steps" if max_steps else "the task's own time limit"
    print(f"{cfg.game}: {ckpt_path} (update {counters['updates']:,}, env step {counters['env_steps']:,}), "
          f"{args.episodes} games, {args.num_simulations} simulations, {cap}, on {device}", flush=True)
    t0, ticker, seen = time.time(), Ticker(), set()

    def progress(step, scores):
        for j in np.flatnonzero(~np.isnan(scores)):
            if j not in seen:
                seen.add(j)
                print(f"game {len(seen)} of {len(scores)} over: game {j} (seed {args.seed + j}) scored "
                      f"{scores[j]:g} in {step:,} steps, {hms(time.time() - t0)}", flush=True)
                ticker.printed()
        if ticker.due():
            print(f"step {step:,}: {len(seen)} of {len(scores)} games over, {hms(time.time() - t0)}", flush=True)

    scores, _ = evaluate(model, cfg, args.episodes, args.seed, max_steps, args.num_simulations, video, progress)
    row = eval_row(scores, counters["env_steps"], counters["updates"], time.time() - t0, cfg.game,
                   max_steps or "task", args.num_simulations, "eval.py")
    line = (f"{cfg.game}: mean {row['mean']:.1f}, std {row['std']:.1f}, min {row['min']:g}, max {row['max']:g} over "
            f"{len(scores)} games")
    if cfg.game in ATARI_100K:
        random_score, human, paper = ATARI_100K[cfg.game]
        line += (f"; human-normalized {row['human_normalized']:.3f} (random {random_score:g}, human {human:g}, "
                 f"EfficientZero paper {paper:g})")
    print(line + f"; {hms(row['seconds'])}")
    append_csv(csv_path, EVAL_FIELDS, row)
    print(f"appended to {csv_path}")
    if video is not None:
        problem = video.check()
        if problem:
            sys.exit(f"eval.py: error: the video {args.video} failed: {problem}")
        print(f"video of game 0: {args.video} ({video.frames:,} frames, H.264)")
    return scores


def cli(argv=None):
    """python eval.py: a bad command line, checkpoint or path ends in one line on stderr and exit status 2."""
    try:
        main(argv)
    except UsageError as e:
        print(f"eval.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("eval.py: interrupted; nothing was appended to eval.csv", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    cli()
