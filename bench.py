"""Throughput benchmarks, one JSON line per case on stdout (CI runs only `device --tiny`, and times nothing).

    python bench.py search                      # defaults by device, below
    python bench.py search --settings tree-only --B 256 --N 50 --A 9 --backend torch
    python bench.py kernels                     # the Triton kernels against the PyTorch reference, timed
    python bench.py train [--preset cartpole]   # the real loop (default: the paper's config on MsPacman)
    python bench.py device                      # everything a GPU session must measure, one command

search: whole `mcts.search` calls (root given), median and min/max over repeats after warm-up, cases
interleaved in rounds so that slow phases of a busy machine hit all alike. Defaults: on a CPU the README's
LightZero comparison (tree-only, A 9, N 50, B 16 64 256, auto (numba), torch: seconds); on CUDA both settings,
A 9 and 18, N 50, B 16 256 1536, triton and torch, CUDA graphs on and off. tree-only is that comparison's fake
model (same weights, numpy default_rng(0)): latent D = 8, next = tanh(W[a] @ latent), linear heads for policy
logits, value and value prefix (both through h^-1), LSTM state (next, c). atari-net is model.py's Atari
network with random weights (minutes per case on a CPU). --share times the tree operations too.
kernels: B trees filled through both backends, identical after every step, then timed (on a CPU with
TRITON_INTERPRET=1: correct, slow, timings meaningless).
train: learner_step and selfplay_step of train.py after a random fill of the buffer, in rounds of
U = E * training_steps / total_transitions updates and one self-play step (the paper: 4 and 4 envs);
median update and step, and the projected run (evaluation not included).
search and kernels use 1 thread: a second OpenMP thread makes each small op wait for a free core on a
busy machine (10x slower here; time the peer with OMP_NUM_THREADS=1 too).
"""
import argparse
import contextlib
import dataclasses
import gc
import glob
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import time

import numpy as np
import torch

import mcts
from config import PRESETS, Config, check_config
from model import NetworkOutput, inverse_scalar_transform, make_model


class TreeOnlyModel:
    """The tree-only model of the README's LightZero comparison (same weights, same draw order)."""

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


def sync(device):
    torch.cuda.synchronize() if torch.device(device).type == "cuda" else None


def atari_problem(B, A, device):
    torch.manual_seed(0)
    net = make_model((12, 96, 96), A).to(device).eval()
    obs = torch.randint(0, 256, (B, 12, 96, 96), dtype=torch.uint8, device=device)
    with torch.no_grad():
        root = net.initial_inference(obs)
    return net, root


class SearchCase:
    def __init__(self, args, setting, B, N, A, backend, graphs):
        self.setting, self.B, self.N, self.A, self.graphs = setting, B, N, A, graphs
        self.device = torch.device(args.device)
        self.backend = mcts.resolve_backend(backend, self.device)
        if setting == "tree-only":
            self.model = TreeOnlyModel(A, self.device)
            self.root = self.model.root(B)
        else:
            self.model, self.root = atari_problem(B, A, self.device)
        self.generator = torch.Generator(device=self.device).manual_seed(0)
        self.tree, self.times, self.depths, self.tree_ms = None, [], [], []

    def once(self, timed=True, share=False):
        sync(self.device)
        gc.collect()
        t0 = time.perf_counter()
        with tree_clock(self.device, on=share) as tree_ms:
            res = mcts.search(self.model, self.root, self.N, add_noise=True, generator=self.generator,
                              backend=self.backend, tree=self.tree, cuda_graphs=self.graphs)
            sync(self.device)
        dt, self.tree = time.perf_counter() - t0, res.tree
        if timed:
            self.times.append(dt)
            if share:
                self.tree_ms.append(tree_ms())
            self.depths.append((res.tree.depth[:, 1:].float().mean().item(), res.tree.depth[:, 1:].max().item()))
            assert bool((res.visit_counts.sum(1) == self.N).all()), "root visits must sum to N"

    def record(self):
        ms = sorted(1e3 * t for t in self.times)
        med = statistics.median(ms)
        rec = {"bench": "search", "backend": self.backend, "device": str(self.device), "setting": self.setting,
               "B": self.B, "N": self.N, "A": self.A, "cuda_graphs": self.graphs and self.device.type == "cuda",
               "ms_median": round(med, 3), "ms_min": round(ms[0], 3), "ms_max": round(ms[-1], 3),
               "sims_per_s": round(self.B * self.N / (med / 1e3), 1), "repeats": len(ms),
               "depth_mean": round(statistics.mean(d[0] for d in self.depths), 2),
               "depth_max": int(max(d[1] for d in self.depths)), "torch_threads": torch.get_num_threads()}
        if self.tree_ms:
            tree = statistics.median(self.tree_ms)
            rec.update(tree_ops_ms_median=round(tree, 3), tree_ops_share=round(tree / med, 3))
        return rec


@contextlib.contextmanager
def tree_clock(device, on):
    """Times the tree operations (select, expand_backup) inside eager searches (a CUDA graph replays without
    calling them): CUDA events around every call (no sync) or the CPU clock. Yields ms_so_far(). (numba: the
    two calls of its fused loop, which also gather and store the latents and LSTM states.)"""
    cuda, spans, saved, cpu = device.type == "cuda", [], mcts._tree_ops, sys.modules.get("mcts_cpu")

    def stamp():
        if not cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def wrap(fn):
        def timed(*args):
            start, out = stamp(), fn(*args)
            spans.append((start, stamp()))
            return out
        return timed

    patches = [(mcts, "_tree_ops", lambda backend, dev: tuple(map(wrap, saved(backend, dev))))] + [
        (cpu, name, wrap(getattr(cpu, name))) for name in ("_select_gather", "_store_expand_backup") if cpu]
    originals = [(module, name, getattr(module, name)) for module, name, _ in patches]
    for module, name, fn in patches if on else []:
        setattr(module, name, fn)
    try:
        yield lambda: sum(s.elapsed_time(e) if cuda else 1e3 * (e - s) for s, e in spans)
    finally:
        for module, name, fn in originals:
            setattr(module, name, fn)


def bench_search(args):
    cuda = torch.device(args.device).type == "cuda"
    defaults = dict(settings=["tree-only", "atari-net"] if cuda else ["tree-only"], B=[16, 256, 1536] if cuda else
                    [16, 64, 256], N=[50], A=[9, 18] if cuda else [9], backend=["triton", "torch"] if cuda else
                    ["auto", "torch"], graphs=["on", "off"] if cuda else ["off"])
    vars(args).update({k: v for k, v in defaults.items() if getattr(args, k) is None})
    torch.set_num_threads(args.threads or torch.get_num_threads())
    cases = [SearchCase(args, s, B, N, A, backend, graphs == "on") for s in args.settings for B in args.B
             for N in args.N for A in args.A for backend in args.backend for graphs in args.graphs]
    for c in cases:
        for _ in range(args.warmup):
            c.once(timed=False)
    # Interleave configurations in rounds (so does the README's LightZero comparison)
    for r in range(args.rounds):
        for c in cases:
            for _ in range(args.repeats // args.rounds + (r < args.repeats % args.rounds)):
                c.once(share=args.share and not (c.graphs and cuda))
    for c in cases:
        print(json.dumps(c.record()), flush=True)


def bench_kernels(args):
    """The Triton kernels against the PyTorch reference, step by step, then timed (no network)."""
    import mcts_kernel
    device, gamma, horizon = args.device, 0.997**4, 5
    if device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("bench.py kernels: no GPU: run with TRITON_INTERPRET=1 to use the Triton interpreter")
    torch.set_num_threads(args.threads or torch.get_num_threads())
    ops = {"torch": (mcts.select, mcts.expand_backup), "triton": (mcts_kernel.select, mcts_kernel.expand_backup)}

    def root_and_leaves(B, S, A, seed):  # a tree holding its root, and S random (value prefix, value, logits)
        g = torch.Generator(device).manual_seed(seed)
        tree = mcts.make_tree(B, S + 1, A, (1,), 1, device)
        tree.visit_count[:, mcts.ROOT] = 1
        tree.value_sum[:, mcts.ROOT] = torch.randn(B, generator=g, device=device)
        tree.prior[:, mcts.ROOT] = torch.softmax(torch.randn(B, A, generator=g, device=device), -1)
        tree.tiebreak.uniform_(0.0, 1.0, generator=g)
        return tree, [(torch.randn(B, generator=g, device=device), torch.randn(B, generator=g, device=device),
                       torch.randn(B, A, generator=g, device=device)) for _ in range(S)]

    def fill(backend, tree, leaves):
        for i, (value_prefix, value, policy_logits) in enumerate(leaves, start=1):
            parent, action, _ = ops[backend][0](tree, 19652, 1.25, gamma, 0.01)
            ops[backend][1](tree, i, parent, action, value_prefix, value, policy_logits, gamma, horizon)

    B, A, S = (257, 18, 50) if device == "cuda" else (9, 7, 20)  # awkward sizes: B odd, A not a power of 2
    (ref, leaves), same = root_and_leaves(B, S, A, seed=0), 0
    ker = mcts.Tree(**{name: getattr(ref, name).clone() for name in ref.__dataclass_fields__})
    for i, (value_prefix, value, policy_logits) in enumerate(leaves, start=1):
        r, k = mcts.select(ref, 19652, 1.25, gamma, 0.01), mcts_kernel.select(ker, 19652, 1.25, gamma, 0.01)
        same += all(torch.equal(x, y) for x, y in zip(r, k))
        mcts.expand_backup(ref, i, r[0], r[1], value_prefix, value, policy_logits, gamma, horizon)
        mcts_kernel.expand_backup(ker, i, r[0], r[1], value_prefix, value, policy_logits, gamma, horizon)
    worst = {name: (getattr(ref, name).float() - getattr(ker, name).float()).abs().max().item()
             for name in ("visit_count", "value_sum", "children", "prior", "min_max", "depth")}
    print(json.dumps({"bench": "kernels_check", "device": device, "B": B, "A": A, "S": S,
                      "select_identical_steps": same, "max_abs_diff": worst}), flush=True)
    for B, A, S in ([(256, 18, 50), (1536, 18, 50)] if device == "cuda" else [(8, 18, 10)]):
        for backend in ("torch", "triton"):
            runs = [root_and_leaves(B, S, A, seed=2) for _ in range(4)]
            fill(backend, *runs[0])  # warm-up (compiles)
            sync(device)
            t0 = time.perf_counter()
            for tree, leaves in runs[1:]:
                fill(backend, tree, leaves)
            sync(device)
            ms = (time.perf_counter() - t0) / 3 * 1e3
            print(json.dumps({"bench": "kernels", "device": device, "backend": backend, "B": B, "A": A, "S": S,
                              "ms_per_search": round(ms, 3), "us_per_simulation": round(ms / S * 1e3, 1)}),
                  flush=True)


def bench_train(args):
    import train  # the real loop's functions
    from atari import make_env
    torch.set_num_threads(args.threads or torch.get_num_threads())
    types = {f.name: f.type for f in dataclasses.fields(Config)}  # int, float, str or bool
    sets = {k: v.lower() in ("1", "true", "on") if types[k] is bool else types[k](v)
            for k, v in (kv.split("=", 1) for kv in args.set)}
    cfg = check_config(Config(**{**PRESETS.get(args.preset, {}), **({"game": args.game} if args.game else {}),
                                 "device": args.device, "amp": args.amp == "on", **sets}))
    device = torch.device(args.device)
    env = make_env(cfg.game, cfg.num_envs, cfg.seed, train=True, max_episode_steps=cfg.max_episode_steps)
    st = train.build(cfg, env, device)
    t0 = time.perf_counter()
    obs = train.fill_random(st, env, env.reset(), max(args.fill or cfg.start_transitions, cfg.start_transitions))
    print(f"filled the buffer with {len(st.buf):,} random transitions in {time.perf_counter() - t0:.1f} s",
          file=sys.stderr, flush=True)
    ratio = cfg.num_envs * cfg.training_steps / cfg.total_transitions        # updates per self-play step
    per_round, steps_per_round = (max(1, round(ratio)), 1) if ratio >= 1 else (1, round(1 / ratio))

    def timed(fn):
        sync(device)
        t = time.perf_counter()
        out = fn()
        sync(device)
        return out, time.perf_counter() - t

    tree, learn, play, rounds = None, [], [], []
    warmup_rounds = -(-args.warmup // per_round)  # ceil
    total_rounds = warmup_rounds + -(-args.updates // per_round)
    for r in range(total_rounds):
        t_round = time.perf_counter()
        times = [timed(lambda: train.learner_step(st, cfg))[1] for _ in range(per_round)]
        steps = []
        for _ in range(steps_per_round):  # (obs, tree) carry over to the next step
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
    wall, learn_ms, play_ms = sum(rounds), 1e3 * statistics.median(learn), 1e3 * statistics.median(play)
    projected = cfg.training_steps / per_round * statistics.median(rounds) + cfg.last_steps * learn_ms / 1e3
    print(json.dumps({
        "bench": "train", "device": str(device), "game": cfg.game, "preset": args.preset, "num_envs": cfg.num_envs,
        "batch_size": cfg.batch_size, "num_simulations": cfg.num_simulations, "amp": st.scaler.is_enabled(),
        "search_backend": mcts.resolve_backend(cfg.search_backend, device), "cuda_graphs": cfg.cuda_graphs and
        device.type == "cuda", "buffer": len(st.buf), "updates_per_round": per_round,
        "selfplay_steps_per_round": steps_per_round, "timed_updates": len(learn),
        "update_ms_median": round(learn_ms, 2), "selfplay_step_ms_median": round(play_ms, 2),
        "updates_per_s": round(len(learn) / wall, 3), "env_steps_per_s": round(len(play) * cfg.num_envs / wall, 3),
        "total_updates": cfg.training_steps + cfg.last_steps, "projected_hours": round(projected / 3600, 3),
        "torch_threads": torch.get_num_threads(),
    }), flush=True)


# ---------------------------------------------------------------------------------------------
# bench.py device: one command for a GPU session (device_stages). --tiny: the same, small, on any machine.
# ---------------------------------------------------------------------------------------------
TINY = ["num_envs=2", "num_simulations=2", "batch_size=4", "start_transitions=40", "td_steps=10",  # CartPole
        "total_transitions=400", "eval_episodes=1", "eval_max_episode_steps=10"]


def device_stages(args, run_dir):
    """Stages, each a subprocess with its own time cap (475 s in all; a failing stage is reported and the
    next runs): the CUDA tests; the search table (Atari net, A 9, N 50, B 16 256 1536, triton and torch,
    CUDA graphs on and off); the tree operations' share of an eager search; bench.py train on the paper's
    MsPacman configuration, AMP on and off; a real `train.py --game MsPacman` run of about 3 minutes
    (SIGINT at its cap less 20 s, a checkpoint every 100 updates); eval.py on its checkpoint, one game.
    Writes OUT (JSON, after every stage) and OUT with .md (tables)."""
    py, tiny, runs = sys.executable, args.tiny, os.path.join(run_dir, "runs")
    pick = lambda small, full: small if tiny else full  # noqa: E731
    backends = ["triton", "torch"] if not tiny or os.environ.get("TRITON_INTERPRET") == "1" else ["torch"]
    search = [py, "bench.py", "search", "--settings", "atari-net", "--A", "9", "--N", pick("4", "50"), "--warmup",
              "1", "--backend"]
    train_tiny = ["--preset", "cartpole", "--updates", "2", "--warmup", "1", "--threads", "1", "--set",
                  "training_steps=200", *TINY]
    run_tiny = ["--preset", "cartpole", "--training-steps", "8", "--log-interval", "20", "--eval-interval", "8",
                *("--" + kv.replace("_", "-") for kv in TINY)]
    return [
        ("cuda tests", 60, [py, "-m", "pytest", "-q", "-rs", "tests/test_mcts_kernel.py", "tests/test_mcts.py",
                            "-k", pick("cuda", "cuda or graph")]),
        ("search", 90, [*search, *backends, "--B", *pick(["2"], ["16", "256", "1536"]), "--graphs", "on", "off",
                         "--repeats", pick("2", "5"), "--rounds", pick("1", "5")]),
        ("tree share", 20, [*search, backends[0], "--B", *pick(["2"], ["256", "1536"]), "--graphs", "off", "--share",
                            "--repeats", pick("2", "3"), "--rounds", "1"]),
        *((f"train, AMP {amp}", 45, [py, "bench.py", "train", *pick(train_tiny, ["--updates", "12"]), "--amp", amp])
          for amp in ("on", "off")),
        ("train.py run", 170, [py, "train.py", *pick(run_tiny, ["--game", "MsPacman", "--log-interval", "200"]),
                               "--save-interval", pick("4", "100"), "--runs-dir", runs]),
        ("eval.py", 45, [py, "eval.py", "--episodes", "1", *pick(["--num-simulations", "2", "--max-episode-steps",
                                                                  "20"], ["--max-episode-steps", "3000"]),
                         "--ckpt", os.path.join(runs, "*", "ckpt.pt")]),
    ]


def run_stage(name, cap, cmd, run_s):
    """Run one stage with a time cap; train.py gets SIGINT after run_s seconds (it checkpoints and stops)."""
    if "--ckpt" in cmd:  # the checkpoint written by the train.py stage
        found = sorted(glob.glob(cmd[-1]))
        if not found:
            return {"stage": name, "status": "skipped", "reason": "no checkpoint from the train.py stage"}
        cmd = cmd[:-1] + [found[-1]]
    t0, status, limit = time.time(), "ok", run_s if cmd[1] == "train.py" else cap
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGINT)  # train.py: stop at the next step, write a checkpoint
        try:
            out, _ = proc.communicate(timeout=max(cap - limit, 5))
            status = "stopped" if cmd[1] == "train.py" else "timeout"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
            status = "timeout"
    status = "failed" if status == "ok" and proc.returncode else status
    lines = out.splitlines()
    results = [json.loads(line) for line in lines if line.startswith('{"bench"')]
    return {"stage": name, "status": status, "returncode": proc.returncode, "seconds": round(time.time() - t0, 1),
            "cmd": " ".join(cmd), "results": results, "output_tail": lines[-40:]}


def markdown(report):
    rows = ["| stage | status | s | last line |", "|---|---|---|---|"]
    rows += [f"| {s['stage']} | {s['status']} | {s.get('seconds', '')} | "
             f"{(s.get('reason') or (s.get('output_tail') or [''])[-1])[:120]} |" for s in report["stages"]]
    search = [r for s in report["stages"] for r in s.get("results", []) if r.get("bench") == "search"]
    if search:
        rows += ["", "| setting | backend | graphs | B | N | A | ms/search | sims/s | tree ops share |",
                 "|---|---|---|---|---|---|---|---|---|"]
        rows += [f"| {r['setting']} | {r['backend']} | {r['cuda_graphs']} | {r['B']} | {r['N']} | {r['A']} | "
                 f"{r['ms_median']} | {r['sims_per_s']:,.0f} | {r.get('tree_ops_share', '')} |" for r in search]
    train = [r for s in report["stages"] for r in s.get("results", []) if r.get("bench") == "train"]
    if train:
        rows += ["", "| game | AMP | ms/update | ms/self-play step | projected hours (all updates) |", "|---|---|---|---|---|"]
        rows += [f"| {r['game']} | {r['amp']} | {r['update_ms_median']} | {r['selfplay_step_ms_median']} | "
                 f"{r['projected_hours']} |" for r in train]
    return "\n".join([f"# bench.py device, {report['started']}", "", report["machine"], "", *rows, ""])


def bench_device(args):
    run_dir = os.path.join("runs", f"device-{time.strftime('%Y%m%d-%H%M%S')}")  # the train.py run, its checkpoint
    out = args.out or run_dir + ".json"
    md = os.path.splitext(out)[0] + ".md"
    for folder in (run_dir, os.path.dirname(out) or "."):
        os.makedirs(folder, exist_ok=True)
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"
    report = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "tiny": args.tiny, "stages": [],
              "machine": f"{gpu}; torch {torch.__version__}; python {sys.version.split()[0]}"}
    for name, cap, cmd in device_stages(args, run_dir):
        if args.stages and not any(s in name for s in args.stages):
            continue
        print(f"[bench.py device] {name} (cap {cap} s): {' '.join(cmd)}", file=sys.stderr, flush=True)
        stage = run_stage(name, cap, cmd, args.run_seconds if args.run_seconds else cap - 20)
        report["stages"].append(stage)
        print(f"[bench.py device] {name}: {stage['status']} in {stage.get('seconds', 0)} s", file=sys.stderr,
              flush=True)
        with open(out, "w") as f, open(md, "w") as g:  # after every stage, so a cut session keeps what ran
            json.dump(report, f, indent=1)
            g.write(markdown(report))
    print(json.dumps({"bench": "device", "json": out, "markdown": md,
                      "statuses": {s["stage"]: s["status"] for s in report["stages"]}}), flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    s = sub.add_parser("search", help="time mcts.search", description=__doc__.split("\n\n")[2])
    for name, help in (("--B", "roots"), ("--N", "simulations"), ("--A", "actions")):
        s.add_argument(name, type=int, nargs="+", help=help)
    s.add_argument("--settings", "--setting", nargs="+", choices=["tree-only", "atari-net"])
    s.add_argument("--backend", nargs="+", choices=["auto", "torch", "triton", "numba"])
    s.add_argument("--graphs", nargs="+", choices=["on", "off"], help="CUDA graphs (CUDA only)")
    s.add_argument("--share", action="store_true", help="also time the tree operations (eager searches)")
    s.add_argument("--repeats", type=int, default=15, help="timed searches per case")
    s.add_argument("--rounds", type=int, default=5)
    s.add_argument("--warmup", type=int, default=2)
    s.set_defaults(func=bench_search)
    k = sub.add_parser("kernels", help="check the Triton kernels against mcts.py's reference and time both")
    k.set_defaults(func=bench_kernels)
    t = sub.add_parser("train", help="time the training loop and project a full run")
    t.add_argument("--preset", choices=sorted(PRESETS), help="a train.py preset (default: the paper's config)")
    t.add_argument("--game", help="default: the preset's, else MsPacman")
    t.add_argument("--amp", choices=["on", "off"], default="on", help="mixed precision (CUDA only)")
    t.add_argument("--updates", type=int, default=20, help="timed updates (rounded up to whole rounds)")
    t.add_argument("--warmup", type=int, default=4, help="untimed updates first")
    t.add_argument("--fill", type=int, default=0, help="random transitions in the buffer first (default: "
                   "the config's start_transitions)")
    t.add_argument("--set", nargs="+", default=[], metavar="FIELD=VALUE", help="Config overrides, e.g. "
                   "num_simulations=2 batch_size=8")
    t.set_defaults(func=bench_train)
    for p, threads in ((s, 1), (k, 1), (t, 0)):
        p.add_argument("--device", default=default_device)
        p.add_argument("--threads", type=int, default=threads, help="torch CPU threads (0: torch's default)")
    d = sub.add_parser("device", help="every measurement a GPU session needs, in at most 8 minutes",
                       description=device_stages.__doc__)
    d.add_argument("--out", help="JSON path (default runs/device-<time>.json; the .md sits beside it; the train.py "
                   "run goes to runs/device-<time>/ in any case)")
    d.add_argument("--tiny", action="store_true", help="small sizes and CartPole: seconds, on any machine")
    d.add_argument("--stages", nargs="+", help="run only the stages whose name contains one of these")
    d.add_argument("--run-seconds", type=float, default=0, help="stop train.py after this long (default: cap - 20)")
    d.set_defaults(func=bench_device)
    args = ap.parse_args()
    print(json.dumps({"meta": True, "cmd": " ".join(sys.argv), "torch": torch.__version__}), file=sys.stderr)
    args.func(args)


if __name__ == "__main__":
    main()
