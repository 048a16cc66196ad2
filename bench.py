"""Throughput benchmarks, one JSON line per case on stdout (CI runs none of this).

    python bench.py search                      # all cases: B {16,64,256,1536} x N {16,50} x A {9,18}
    python bench.py search --settings tree-only --B 256 --N 50 --A 9 --backend torch
    python bench.py train                       # the paper's configuration on MsPacman
    python bench.py train --preset cartpole --updates 200

search: time of one whole `mcts.search` call (root given, as the peer harness does), median and
min/max over repeats after warm-up, configurations interleaved over rounds so that slow phases of
a noisy machine hit all of them alike. Settings:
  tree-only  the trivial fake model of /work/shared/peers/bench_lightzero.py (same weights from
             numpy default_rng(0)): latent D = 8, next = tanh(W[a] @ latent), linear heads for
             policy logits, value and value prefix (both through h^-1), LSTM state (h, c) =
             (next, c). Measures the tree operations and the search loop.
  atari-net  the real Atari network of model.py, make_model((12, 96, 96), A), random weights
             (on a CPU only small B are practical).
train: the real loop of train.py (learner_step and selfplay_step, the same functions) after the
buffer is filled with random transitions: rounds of U updates and one self-play step of the E envs,
U = E * training_steps / total_transitions (the paper: 4 updates per step of 4 envs, one env step per
update). Reports the median time of an update and of a self-play step, updates/s and env steps/s
of the timed rounds, and the projected time of the whole run: training_steps in such rounds plus
last_steps offline updates (evaluation not included).
The defaults pick --threads 1: the search is thousands of small ops, and on a busy machine a
second OpenMP thread makes every op wait for a free core (10x slower here; the peer harness's
torch model suffers the same, run it with OMP_NUM_THREADS=1 to compare like with like).
"""
import argparse
import gc
import json
import math
import statistics
import sys
import time

import numpy as np
import torch

import mcts
import train
from atari import make_env
from model import NetworkOutput, inverse_scalar_transform, make_model


class TreeOnlyModel:
    """The peer harness's tree-only model (bench_lightzero.make_weights, same draw order)."""

    def __init__(self, A, device, D=8):
        rng = np.random.default_rng(0)
        W = rng.standard_normal((A, D, D)) / math.sqrt(D)
        H = rng.standard_normal((D, A + 2)) / math.sqrt(D)
        self.W = torch.from_numpy(W.astype(np.float32)).to(device)  # [A, D, D]
        self.H = torch.from_numpy(H.astype(np.float32)).to(device)  # [D, A + 2]
        self.A, self.D = A, D

    def heads(self, x):  # [B, D] -> logits [B, A], value [B], value prefix [B]
        out = x @ self.H
        return out[:, : self.A], inverse_scalar_transform(out[:, self.A]), inverse_scalar_transform(out[:, self.A + 1])

    def recurrent_inference(self, latent, lstm_state, action, depth):
        nxt = torch.tanh((self.W[action] * latent.unsqueeze(1)).sum(-1))  # [B, D] tanh(W[a] @ latent)
        logits, value, value_prefix = self.heads(nxt)
        return NetworkOutput(nxt, (nxt, lstm_state[1]), value_prefix, value, logits, None, None)

    def root(self, B, seed=1):  # fixed roots, as the peer's Problem(setting, B)
        rng = np.random.default_rng(seed)
        latent = torch.from_numpy(np.tanh(rng.standard_normal((B, self.D))).astype(np.float32)).to(self.W.device)
        logits, value, _ = self.heads(latent)
        zeros = torch.zeros(B, self.D, device=latent.device)
        return NetworkOutput(latent, (zeros, zeros.clone()), torch.zeros_like(value), value, logits, None, None)


def atari_problem(B, A, device):
    torch.manual_seed(0)
    net = make_model((12, 96, 96), A).to(device).eval()
    obs = torch.randint(0, 256, (B, 12, 96, 96), dtype=torch.uint8, device=device)
    with torch.no_grad():
        root = net.initial_inference(obs)
    return net, root


class SearchCase:
    def __init__(self, args, setting, B, N, A):
        self.setting, self.B, self.N, self.A = setting, B, N, A
        self.device = torch.device(args.device)
        self.backend = mcts.resolve_backend(args.backend, self.device)
        if setting == "tree-only":
            self.model = TreeOnlyModel(A, self.device)
            self.root = self.model.root(B)
        else:
            self.model, self.root = atari_problem(B, A, self.device)
        self.generator = torch.Generator(device=self.device).manual_seed(0)
        self.tree, self.times, self.depths = None, [], []

    def once(self, timed=True):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        gc.collect()
        t0 = time.perf_counter()
        res = mcts.search(self.model, self.root, self.N, add_noise=True, generator=self.generator,
                          backend=self.backend, tree=self.tree)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        self.tree = res.tree
        if timed:
            self.times.append(dt)
            depth = res.tree.depth[:, 1:].float()  # [B, N] depths of the expanded nodes
            self.depths.append((depth.mean().item(), depth.max().item()))
            assert bool((res.visit_counts.sum(1) == self.N).all()), "root visits must sum to N"

    def record(self):
        ms = sorted(1e3 * t for t in self.times)
        med = statistics.median(ms)
        return {
            "bench": "search", "backend": self.backend, "device": str(self.device),
            "setting": self.setting, "B": self.B, "N": self.N, "A": self.A,
            "ms_median": round(med, 3), "ms_min": round(ms[0], 3), "ms_max": round(ms[-1], 3),
            "sims_per_s": round(self.B * self.N / (med / 1e3), 1), "repeats": len(ms),
            "depth_mean": round(statistics.mean(d[0] for d in self.depths), 2),
            "depth_max": int(max(d[1] for d in self.depths)),
            "torch_threads": torch.get_num_threads(),
        }


def bench_search(args):
    if args.threads:
        torch.set_num_threads(args.threads)
    cases = [SearchCase(args, s, B, N, A) for s in args.settings for B in args.B for N in args.N for A in args.A]
    for c in cases:
        for _ in range(args.warmup):
            c.once(timed=False)
    # Interleave configurations in rounds, as the peer harness (shared/peers/bench_lightzero.py).
    for r in range(args.rounds):
        for c in cases:
            for _ in range(args.repeats // args.rounds + (r < args.repeats % args.rounds)):
                c.once()
    for c in cases:
        print(json.dumps(c.record()), flush=True)


def bench_train(args):
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = train.check_config(train.Config(**{**train.PRESETS.get(args.preset, {}),
                                             **({"game": args.game} if args.game else {}), "device": args.device}))
    device = torch.device(args.device)
    env = make_env(cfg.game, cfg.num_envs, cfg.seed, train=True, max_episode_steps=cfg.max_episode_steps)
    st = train.build(cfg, env, device)
    obs, fill = env.reset(), max(args.fill or cfg.start_transitions, cfg.start_transitions)
    uniform = np.full((cfg.num_envs, env.num_actions), 1 / env.num_actions, np.float32)
    t0 = time.perf_counter()
    while len(st.buf) < fill:  # random play, as train.py before learning starts
        actions = st.rng.integers(env.num_actions, size=cfg.num_envs)
        next_obs, reward, done, info = env.step(actions)
        st.buf.add(obs, actions, reward, done, np.zeros(cfg.num_envs, np.float32), uniform, info["final_obs"])
        obs = next_obs
    print(f"filled the buffer with {len(st.buf):,} random transitions in {time.perf_counter() - t0:.1f} s",
          file=sys.stderr, flush=True)
    ratio = cfg.num_envs * cfg.training_steps / cfg.total_transitions        # updates per self-play step
    per_round, steps_per_round = (max(1, round(ratio)), 1) if ratio >= 1 else (1, round(1 / ratio))

    def timed(fn):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return out, time.perf_counter() - t

    tree, learn, play, rounds = None, [], [], []
    warmup_rounds = -(-args.warmup // per_round)
    total_rounds = warmup_rounds + -(-args.updates // per_round)
    for r in range(total_rounds):
        t_round = time.perf_counter()
        times = [timed(lambda: train.learner_step(st, cfg))[1] for _ in range(per_round)]
        steps = []
        for _ in range(steps_per_round):
            (obs, tree, _), t_play = timed(lambda: train.selfplay_step(st, env, obs, tree, cfg))
            steps.append(t_play)
        if r >= warmup_rounds:
            learn += times
            play += steps
            rounds.append(time.perf_counter() - t_round)
        print(f"round {r + 1}/{total_rounds}: {per_round} updates {1e3 * statistics.mean(times):.1f} ms each, "
              f"{steps_per_round} self-play steps {1e3 * statistics.mean(steps):.1f} ms each", file=sys.stderr,
              flush=True)
    env.close()
    wall = sum(rounds)
    learn_ms, play_ms = 1e3 * statistics.median(learn), 1e3 * statistics.median(play)
    round_s = statistics.median(rounds)
    projected = cfg.training_steps / per_round * round_s + cfg.last_steps * learn_ms / 1e3
    print(json.dumps({
        "bench": "train", "device": str(device), "game": cfg.game, "preset": args.preset,
        "num_envs": cfg.num_envs, "batch_size": cfg.batch_size, "num_simulations": cfg.num_simulations,
        "amp": st.scaler.is_enabled(), "search_backend": mcts.resolve_backend(cfg.search_backend, device),
        "buffer": len(st.buf), "updates_per_round": per_round, "selfplay_steps_per_round": steps_per_round, "timed_updates": len(learn),
        "update_ms_median": round(learn_ms, 2), "selfplay_step_ms_median": round(play_ms, 2),
        "updates_per_s": round(len(learn) / wall, 3), "env_steps_per_s": round(len(play) * cfg.num_envs / wall, 3),
        "total_updates": cfg.training_steps + cfg.last_steps,
        "projected_hours": round(projected / 3600, 3), "torch_threads": torch.get_num_threads(),
    }), flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("search", help="time mcts.search")
    s.add_argument("--B", type=int, nargs="+", default=[16, 64, 256, 1536])
    s.add_argument("--N", type=int, nargs="+", default=[16, 50], help="simulations")
    s.add_argument("--A", type=int, nargs="+", default=[9, 18])
    s.add_argument("--settings", "--setting", nargs="+", default=["tree-only", "atari-net"],
                   choices=["tree-only", "atari-net"])
    s.add_argument("--backend", default="auto", choices=["auto", "torch", "triton"])
    s.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    s.add_argument("--repeats", type=int, default=15, help="timed searches per case")
    s.add_argument("--rounds", type=int, default=5)
    s.add_argument("--warmup", type=int, default=2)
    s.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (0: torch's default). The search is many small ops: on a "
                        "busy machine a second OpenMP thread makes them wait for a core")
    s.set_defaults(func=bench_search)
    t = sub.add_parser("train", help="time the training loop and project a full run")
    t.add_argument("--preset", choices=sorted(train.PRESETS), help="a train.py preset (default: the paper's config)")
    t.add_argument("--game", help="default: the preset's, else MsPacman")
    t.add_argument("--updates", type=int, default=20, help="timed updates (rounded up to whole rounds)")
    t.add_argument("--warmup", type=int, default=4, help="untimed updates first")
    t.add_argument("--fill", type=int, default=0, help="random transitions in the buffer first (default: "
                   "the config's start_transitions)")
    t.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    t.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    t.set_defaults(func=bench_train)
    args = ap.parse_args()
    print(json.dumps({"meta": True, "cmd": " ".join(sys.argv), "torch": torch.__version__}), file=sys.stderr)
    args.func(args)


if __name__ == "__main__":
    main()
