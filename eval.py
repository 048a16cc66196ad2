"""Evaluate a train.py checkpoint with the paper's protocol (EZ_SPEC §7.1).

    python eval.py --ckpt runs/<run>/ckpt.pt                      # 32 full games, the final test
    python eval.py --ckpt runs/<run>/ckpt.pt --video game.mp4     # also an mp4 of the first game

The network is rebuilt from the checkpoint alone (its model_args and config). Defaults are the final
test of the paper: 32 games with env seeds 0..31, whole games (no episodic life), up to 30 no-op starts,
a 27,000-step (108k-frame) cap, the argmax of a 50-simulation search without root noise, raw scores.
Prints every game, the mean and standard deviation, and the human-normalized score of the mean (Atari).
"""

import argparse
import dataclasses
import sys

import cv2
import numpy as np
import torch

from atari import ATARI_100K, human_normalized_score, make_env
from config import Config, UsageError, load_checkpoint, resolve_device
from mcts import run_search, select_action
from model import make_model


def evaluate(model, cfg, episodes, seed, max_episode_steps, num_simulations, frame_fn=None):
    """Play `episodes` games in parallel with the argmax of a no-noise search (EZ_SPEC §7.1).
    -> raw scores [episodes], lengths [episodes]. frame_fn(obs) sees every observation of game 0."""
    env = make_env(cfg.game, episodes, seed, train=False, max_episode_steps=max_episode_steps)
    generator = torch.Generator(next(model.parameters()).device).manual_seed(seed)
    was_training, tree = model.training, None
    model.eval()
    scores, lengths = np.full(episodes, np.nan), np.zeros(episodes, np.int64)
    obs = env.reset()
    while np.isnan(scores).any():  # games that ended keep playing (one batch shape); only the first game counts
        result = run_search(model, obs, cfg, num_simulations, False, generator, tree)
        tree = result.tree
        actions = select_action(result.visit_counts, 1.0, generator, deterministic=True).cpu().numpy()  # sync point
        if frame_fn is not None and np.isnan(scores[0]):
            frame_fn(obs[0])
        obs, _, _, info = env.step(actions)
        over = info["game_over"] & np.isnan(scores)
        scores[over], lengths[over] = info["episode_return"][over], info["episode_length"][over]
    env.close()
    model.train(was_training)
    return scores, lengths



def video_writer(path, scale=4, fps=15):
    """-> frame_fn(obs [12, 96, 96] uint8) that appends the newest RGB frame to an mp4, and the writer."""
    writer = None

    def write(obs):
        nonlocal writer
        frame = np.ascontiguousarray(obs[-3:].transpose(1, 2, 0)[:, :, ::-1])     # [96, 96, 3] newest frame, BGR
        frame = cv2.resize(frame, None, fx=scale, fy=scale, interpolation=cv2.INTER_NEAREST)
        if writer is None:
            writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"mp4v"), fps, frame.shape[1::-1])
        writer.write(frame)

    return write, lambda: writer is not None and writer.release()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True, help="ckpt.pt of a train.py run")
    p.add_argument("--episodes", type=int, default=32, help="games, played in parallel (EZ_SPEC §7.1: 32)")
    p.add_argument("--num-simulations", type=int, default=50, help="search simulations per move (EZ_SPEC §7.1: 50)")
    p.add_argument("--max-episode-steps", type=int, default=27_000, help="agent-step cap per game (108k frames)")
    p.add_argument("--seed", type=int, default=0, help="game j is seeded seed + j (EZ_SPEC §7.1: 0..31)")
    p.add_argument("--device", default="auto", help='"auto" = cuda when available, else cpu')
    p.add_argument("--video", metavar="OUT.mp4", help="write an mp4 of the first game (Atari only)")
    args = p.parse_args(argv)
    if args.episodes < 1 or args.num_simulations < 1 or args.max_episode_steps < 1:
        raise UsageError("--episodes, --num-simulations and --max-episode-steps must be at least 1")

    ckpt = load_checkpoint(args.ckpt)
    cfg = Config(**{k: v for k, v in ckpt["config"].items() if k in {f.name for f in dataclasses.fields(Config)}})
    device = resolve_device(args.device)
    model = make_model(**ckpt["model_args"])
    model.load_state_dict(ckpt["model"])                       # the final weights, as the paper (EZ_SPEC §7.1)
    model.to(device).eval()
    frame_fn, close_video = None, lambda: None
    if args.video:
        if len(ckpt["model_args"]["obs_shape"]) != 3:
            raise UsageError(f"--video needs an Atari game; {cfg.game} has vector observations")
        frame_fn, close_video = video_writer(args.video)
    print(f"{cfg.game}: {args.ckpt} (update {ckpt['counters']['updates']:,}, env step "
          f"{ckpt['counters']['env_steps']:,}), {args.episodes} games, {args.num_simulations} simulations, "
          f"cap {args.max_episode_steps:,} steps, on {device}")
    scores, lengths = evaluate(model, cfg, args.episodes, args.seed, args.max_episode_steps, args.num_simulations,
                               frame_fn)
    close_video()
    for j, (score, length) in enumerate(zip(scores, lengths)):
        print(f"game {j:2d} (seed {args.seed + j}): score {score:g}, {length:,} steps")
    line = f"mean {scores.mean():.1f} +- {scores.std():.1f} (std) over {len(scores)} games"
    if cfg.game in ATARI_100K:
        random_score, human, paper = ATARI_100K[cfg.game]
        line += (f"; human-normalized {human_normalized_score(cfg.game, scores.mean()):.3f} "
                 f"(random {random_score:g}, human {human:g}, EfficientZero paper {paper:g})")
    print(line)
    if args.video:
        print(f"video of game 0: {args.video}")
    return scores


if __name__ == "__main__":
    try:
        main()
    except UsageError as e:
        sys.exit(f"eval.py: error: {e}")
