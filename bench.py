"""Throughput benchmarks, one JSON line per case on stdout (CI runs none of this).

    python bench.py search                      # all cases: B {16,64,256,1536} x N {16,50} x A {9,18}
    python bench.py search --settings tree-only --B 256 --N 50 --A 9 --backend torch

search: time of one whole `mcts.search` call (root given, as the peer harness does), median and
min/max over repeats after warm-up, configurations interleaved over rounds so that slow phases of
a noisy machine hit all of them alike. Settings:
  tree-only  the trivial fake model of /work/shared/peers/bench_lightzero.py (same weights from
             numpy default_rng(0)): latent D = 8, next = tanh(W[a] @ latent), linear heads for
             policy logits, value and value prefix (both through h^-1), LSTM state (h, c) =
             (next, c). Measures the tree operations and the search loop.
  atari-net  the real Atari network of model.py, make_model((12, 96, 96), A), random weights
             (on a CPU only small B are practical).
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

    def recurrent_inference(self, latent, lstm_state, action):
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
    args = ap.parse_args()
    print(json.dumps({"meta": True, "cmd": " ".join(sys.argv), "torch": torch.__version__}), file=sys.stderr)
    args.func(args)


if __name__ == "__main__":
    main()
