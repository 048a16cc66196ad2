"""The configuration of a run: `Config` (the paper's values), presets, the command line, validation (one UsageError
line per bad input), the rules of --resume, and the checkpoint file (one versioned dict, written atomically).

Paper: Ye et al. 2021, "Mastering Atari Games with Limited Data" (arXiv:2111.00210). Every value in
`Config` cites EZ_SPEC.md (the official code's values, read from its HEAD 468bb03, with sources).
`python train.py --help` prints the fields with these docstrings.
"""

import ast
import argparse
import dataclasses
import difflib
import importlib.util
import inspect
import os
from dataclasses import dataclass

import torch

from atari import ALE_GAMES, canonical_game, check_game


@dataclass
class Config:
    # ---- run ----
    game: str = "MsPacman"
    """Atari 100k game (EZ_SPEC §7.2) or a gymnasium id with vector observations, e.g. CartPole-v1"""
    exp_name: str = "efficientzero"
    """name of the experiment: runs/{game}__{exp_name}__{seed}__{unix time}/"""
    seed: int = 0
    """seeds python, numpy and torch once; self-play env i gets seed + i, evaluation env j seed + num_envs + j"""
    device: str = "auto"
    """"auto" = cuda when available, else cpu"""
    amp: bool = True
    """mixed precision (autocast fp16 + GradScaler) on CUDA, as train.sh --amp_type torch_amp (EZ_SPEC §4.1)"""
    runs_dir: str = "runs"
    """where run directories are made"""
    torch_threads: int = 0
    """torch intra-op CPU threads; 0 keeps torch's default (1 is fastest for the small CPU presets)"""
    # ---- environment and data budget ----
    num_envs: int = 4
    """parallel self-play envs, p_mcts_num = 4 in train.sh (EZ_SPEC §6; 8 in the first release, §0.1.7)"""
    max_episode_steps: int = 3_000
    """training episode cap in agent steps, 12k frames in HEAD (EZ_SPEC §1, §0.1.5)"""
    total_transitions: int = 100_000
    """env steps stored in the buffer, the Atari 100k budget (EZ_SPEC §1); pacing keeps env steps at or below
    updates * total_transitions / training_steps, i.e. 1 env step per update in the paper (EZ_SPEC §6)"""
    absorbing_terminal: bool = True
    """unroll steps past a terminal state learn value 0 and reward 0 whatever the action (absorbing, as MuZero and
    the original's first release); off: those losses are masked, as the original's HEAD (EZ_SPEC §0.1.3)"""
    time_limit_terminal: bool = False
    """end episodes cut by max_episode_steps as terminal (absorbing, value 0 after), as the original (EZ_SPEC §5.2
    quirk c); off: they are truncated, and no value target bootstraps across the cut (README "Differences")"""
    start_transitions: int = 2_000
    """learning starts once the buffer holds this many transitions, 8000 frames // 4 (EZ_SPEC §4.1)"""
    # ---- learner ----
    training_steps: int = 100_000
    """updates while collecting data (EZ_SPEC §4.1)"""
    last_steps: int = 20_000
    """updates on the frozen buffer after collection ends (EZ_SPEC §4.1)"""
    batch_size: int = 256
    """sequences per update (EZ_SPEC §4.1)"""
    num_unroll_steps: int = 5
    """K, dynamics unroll steps (EZ_SPEC §4.1)"""
    td_steps: int = 5
    """n of the n-step value target before the off-policy correction shrinks it (EZ_SPEC §5.1)"""
    discount: float = 0.997 ** 4
    """gamma per agent step, 0.997 per frame with frame skip 4 (EZ_SPEC §1)"""
    lr_init: float = 0.2
    """SGD learning rate after warm-up (EZ_SPEC §4.1)"""
    lr_warm_up: float = 0.01
    """fraction of training_steps with a linear warm-up from 0, 1k steps (EZ_SPEC §4.1)"""
    lr_decay_rate: float = 0.1
    """learning rate factor every lr_decay_steps after warm-up, 0.02 from step 101k (EZ_SPEC §4.1)"""
    lr_decay_steps: int = 100_000
    """(EZ_SPEC §4.1)"""
    momentum: float = 0.9
    """SGD momentum (EZ_SPEC §4.1)"""
    weight_decay: float = 1e-4
    """SGD weight decay on all parameters, BN and biases included (EZ_SPEC §4.1)"""
    max_grad_norm: float = 5.0
    """global L2 gradient clipping (EZ_SPEC §4.1)"""
    value_loss_coeff: float = 0.25
    """(EZ_SPEC §4.1)"""
    policy_loss_coeff: float = 1.0
    """(EZ_SPEC §4.1)"""
    value_prefix_loss_coeff: float = 1.0
    """(EZ_SPEC §4.1)"""
    consistency_coeff: float = 2.0
    """(EZ_SPEC §4.1)"""
    augmentation: bool = True
    """random shift (replicate pad 4, crop) + intensity on image observations (EZ_SPEC §4.1)"""
    target_refresh_interval: int = 200
    """the target network takes the weights of the previous refresh point, lagging 200-400 updates (EZ_SPEC §4.1)"""
    selfplay_refresh_interval: int = 100
    """updates between copies of the learner weights into the acting network (EZ_SPEC §4.1, §6)"""
    priority_alpha: float = 0.6
    """PER exponent (EZ_SPEC §4.1)"""
    priority_beta: float = 0.4
    """PER importance exponent, annealed linearly to 1 over all updates (EZ_SPEC §4.1)"""
    priority_eps: float = 1e-6
    """added to |v - z| for new priorities (EZ_SPEC §4.3.7)"""
    replay_window: int = 0
    """learn only from the newest this many transitions that can be sampled (0: from all of them, as the original)"""
    value_window: int = 0
    """train the value only on samples at most this many transitions old, a hard off-policy correction
    (CARTPOLE.md, round 4); the other losses use every sample; 0: every sample, as the original"""
    window_td_steps: int = 0
    """with value_window: the older samples keep their value loss, with a TD horizon of at most this many steps
    (a stronger form of the paper's off-policy correction; CARTPOLE.md, round 13); 0: they have none"""
    # ---- the three EfficientZero components (paper Table 3 ablations) ----
    consistency: bool = True
    """self-supervised temporal consistency loss (EZ_SPEC §4.3)"""
    value_prefix: bool = True
    """LSTM value prefix (EZ_SPEC §2.2, §5.3); off: lstm_horizon_len = 1 in targets, unroll and search, so the
    head predicts the one-step reward r_{t+k-1} and the search's edge reward is that prediction (MuZero)"""
    off_policy_correction: bool = True
    """TD horizon shrinking with the age of the data (EZ_SPEC §5.1); off: always td_steps"""
    # ---- reanalysis ----
    reanalyze_ratio: float = 0.99
    """fraction of each batch whose policy targets are re-searched (EZ_SPEC §5.4)"""
    reanalyze_noise: bool = True
    """Dirichlet noise at the roots of the reanalysis searches, as the original (EZ_SPEC §5.4)"""
    use_root_value: bool = False
    """bootstrap values from a search root value instead of the network value; off in train.sh (EZ_SPEC §5.2)"""
    # ---- search (EZ_SPEC §3) ----
    num_simulations: int = 50
    """simulations per search in self-play, reanalysis and evaluation"""
    pb_c_base: float = 19652.0
    """c2 of pUCT"""
    pb_c_init: float = 1.25
    """c1 of pUCT"""
    root_dirichlet_alpha: float = 0.3
    """Dirichlet noise at the roots of self-play and reanalysis searches"""
    root_exploration_fraction: float = 0.25
    """prior <- (1 - f) prior + f noise"""
    acting_temperature: float = 0.0
    """self-play's T in a ~ n(a)^(1/T); 0: 1, then 0.5 and 0.25 from 1/2 and 3/4 of training_steps (EZ_SPEC §6)"""
    greedy_fraction: float = 0.0
    """fraction of the self-play envs (the last round(f * num_envs)) that play as evaluation does: a search without
    root noise and its most visited action, instead of noise and a sample at the acting temperature; 0: none, as
    the original (CARTPOLE.md round 19 tried 0.5: not adopted)"""
    explore_hold: int = 1
    """while the acting temperature is 1 (the random warm-up included), the self-play envs that sample their actions
    keep each one they chose for 1 to this many steps, spread evenly over the envs (8 envs, 4: 1 1 2 2 3 3 4 4;
    one env: 4; a new episode chooses anew), searching every step as before; 1: every step chooses, as the original
    (CARTPOLE.md round 20 tried 4: Acrobot-v1 found its goal on 7 of 7 seeds, CartPole-v1 lost; not adopted)"""
    value_delta_max: float = 0.01
    """floor of max - min in the Q normalization"""
    lstm_horizon_len: int = 5
    """zeta: the value prefix restarts every zeta steps of an unroll or a search path"""
    search_backend: str = "auto"
    """"torch", "triton", "numba" or "auto" (triton on CUDA, numba on the CPU if installed, else torch)"""
    cuda_graphs: bool = True
    """on CUDA, record each search's simulation loop in a CUDA graph once per network and search size and replay
    it (mcts.py "CUDA graphs"); --no-cuda-graphs runs it eagerly"""
    compile: bool = False
    """torch.compile the learner's K-step unroll, forward and backward (train.py compiled_unroll): fewer, fused
    operations per update, after a one-off compile per batch size; the same losses up to float rounding (the sums
    run in another order). On a CPU it needs a C++ compiler (g++, or $CXX)"""
    # ---- network (EZ_SPEC §2; hidden and latent_dim are for vector observations) ----
    channels: int = 64
    """latent channels"""
    blocks: int = 1
    """residual blocks at the end of the representation"""
    reduced_channels: int = 16
    """1x1-conv channels before the value, value prefix and policy heads"""
    fc_hidden: int = 32
    """hidden width of the value, value prefix and policy heads"""
    lstm_hidden: int = 512
    """LSTM of the value prefix"""
    support_size: int = 300
    """value and value prefix supports [-300, 300], 601 bins (EZ_SPEC §2.5)"""
    proj_hid: int = 1024
    """SimSiam projection hidden width (EZ_SPEC §2.4)"""
    proj_out: int = 1024
    """SimSiam projection output width"""
    pred_hid: int = 512
    """SimSiam predictor hidden width"""
    pred_out: int = 1024
    """SimSiam predictor output width"""
    state_norm: bool = False
    """per-sample min-max scaling of every latent to [0, 1], the original's option, off for Atari (EZ_SPEC §2.1)"""
    bn_stats: str = "depth"
    """BatchNorm running statistics of the dynamics and prediction networks: "depth" keeps one set per unroll
    depth 0..K and inference at depth d uses set min(d, K), as the learner normalized that depth (README
    "Differences"); "shared" keeps one set averaged over all depths, as the original"""
    hidden: int = 128
    """MLP hidden width (vector observations)"""
    latent_dim: int = 64
    """MLP latent size (vector observations)"""
    obs_norm: bool = False
    """vector observations: a BatchNorm on the representation's input, so that every feature enters at unit scale
    whatever its units (CartPole's pole angle moves by hundredths of a radian, its cart by a metre); not in the
    original, off by default (CARTPOLE.md round 12 measures it)"""
    # ---- evaluation, logging, checkpoints ----
    eval_interval: int = 10_000
    """updates between evaluations during training, and one at the end (EZ_SPEC §7.1)"""
    eval_episodes: int = 32
    """games per evaluation (EZ_SPEC §7.1)"""
    eval_max_episode_steps: int = 3_000
    """agent-step cap of evaluation games during training (EZ_SPEC §7.1; eval.py plays the 27k-step protocol)"""
    log_interval: int = 1_000
    """loop steps (env steps + updates) between progress lines, TensorBoard scalars and metrics.csv rows"""
    save_interval: int = 10_000
    """updates between checkpoints (ckpt.pt, written atomically), and one at the end"""
    save_buffer: bool = True
    """store the replay buffer and the running episodes in ckpt.pt, so a stopped run resumes at the same pace with
    all its data; on Atari 100k that is up to 2.6 GiB per checkpoint (README "Progress, stop and resume");
    --no-save-buffer writes only the networks and counters, and a resume then refills the buffer from scratch"""


PRESETS = {
    # A quick CPU run of an Atari game: tiny network, few simulations, a few dozen updates.
    "atari-quick": dict(
        channels=16, reduced_channels=4, fc_hidden=16, lstm_hidden=32, proj_hid=64, proj_out=64, pred_hid=32,
        pred_out=64, num_envs=2, num_simulations=4, batch_size=8, total_transitions=400, start_transitions=64,
        training_steps=40, last_steps=8, max_episode_steps=400, eval_interval=30, eval_episodes=2,
        eval_max_episode_steps=60, log_interval=40, save_interval=20, torch_threads=1),
    # Small vector-observation tasks (CartPole-v1 by default, MLP): 10,000 env steps and 20,000 updates, 6-8
    # minutes on 2 cores. Where it departs from the paper's values, CARTPOLE.md (the CartPole ablations) says why:
    # td_steps 30 (with 5 the value targets stayed far below the true returns) and uniform replay (priority_alpha 0;
    # the two together, round 11), no policy reanalysis (4.5x cheaper updates, higher ends), lr 0.05, discount 0.99
    # (the paper's per agent step is 0.997^4 = 0.988), short refresh intervals, the value's TD horizon cut to 5 on
    # samples older than 4,000 transitions (value_window, window_td_steps; rounds 4 and 13), inputs at unit scale
    # (obs_norm; rounds 12 and 13), two updates per env step (round 17: slow climbers reach the top in time).
    # start_transitions 600: 8 x (5 + 30) of them wait for their targets.
    "cartpole": dict(
        game="CartPole-v1", max_episode_steps=500, hidden=64, latent_dim=32, lstm_hidden=32, proj_hid=64,
        proj_out=64, pred_hid=32, pred_out=64, support_size=30, state_norm=True, num_envs=8, num_simulations=25,
        batch_size=256, total_transitions=10_000, start_transitions=600, training_steps=20_000, last_steps=0,
        td_steps=30, priority_alpha=0.0, discount=0.99, lr_init=0.05, reanalyze_ratio=0.0, value_window=4_000,
        window_td_steps=5, obs_norm=True, target_refresh_interval=30, selfplay_refresh_interval=10,
        eval_interval=2_000, eval_episodes=8, eval_max_episode_steps=500, log_interval=500, save_interval=500,
        torch_threads=1),
}


class UsageError(Exception):
    """A bad command line or checkpoint: the message names the problem and the fix (one line, exit status 2)."""


# Fields a resumed run may change: where and how fast it runs, what it logs, and a longer budget. Every other
# field would change the algorithm or the network of a run half done, so --resume refuses it.
RESUMABLE = ("device", "torch_threads", "search_backend", "compile", "training_steps", "last_steps", "eval_interval",
             "eval_episodes", "eval_max_episode_steps", "log_interval", "save_interval", "save_buffer", "cuda_graphs")


# ---- TRY NOT TO MODIFY: the command line from Config, validation, resume rules ----

def field_docs(cls):
    """Field name -> the docstring under it (the CleanRL / tyro convention), for --help."""
    body = ast.parse(inspect.getsource(cls)).body[0].body
    return {a.target.id: b.value.value.strip() for a, b in zip(body, body[1:])
            if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant)}


def flag(name):
    return "--" + name.replace("_", "-")


def close_names(word, known, n=2):
    """The known names that start with word (--lr: --lr-init), else the most similar ones. Compared without the
    leading "--" that every flag shares, which made --bogus look like --blocks."""
    starts = sorted((k for k in known if k.startswith(word)), key=len)
    return starts[:n] or difflib.get_close_matches(word, known, n=n)


class Parser(argparse.ArgumentParser):
    """argparse that reports a bad command line as one UsageError line (not its 60-line usage), with the
    closest flags for an unknown one."""

    def error(self, message):
        if message.startswith("unrecognized arguments"):
            known = [s[2:] for s in self._option_string_actions if s.startswith("--") and s != "--help"]
            hints = []
            for arg in message.split(": ")[1].split():
                close = close_names(arg[2:].split("=")[0].replace("_", "-"), known) if arg.startswith("--") else []
                if close:
                    hints.append("did you mean " + " or ".join("--" + c for c in close))
            message += "; " + ", ".join(hints) if hints else ""
        raise UsageError(f"{message} (see {self.prog} --help)")


EPILOG = """\
stop and resume:
  Ctrl-C or SIGTERM finishes the current step, writes ckpt.pt and prints the command that resumes the run;
  a second Ctrl-C aborts at once (the last ckpt.pt stays intact: it is written to a temporary file first).
  ckpt.pt holds the replay buffer by default, so the resumed run goes on at the same pace with all its data:
  on Atari 100k up to 2.6 GiB on disk, 16-69 s to write and 8-9 s to read back on a busy 2-core CPU VM
  (README "Progress, stop and resume"); --no-save-buffer leaves it out, and a resumed run then starts with an
  empty buffer.
  --resume takes the configuration stored in the checkpoint; of the flags above it accepts only
  """ + ", ".join("--" + n.replace("_", "-") for n in RESUMABLE) + """.
files: runs/{game}__{exp_name}__{seed}__{unix time}/ config.json (what ran), metrics.csv, eval.csv,
  ckpt.pt (last), best.pt (best evaluation, for eval.py), TensorBoard events (tensorboard --logdir runs)
"""


def parse_args(argv=None, description=None):
    """-> (explicit overrides {field: value}, preset name or None, resume path or None)."""
    p = Parser(prog="train.py", description=description, argument_default=argparse.SUPPRESS, allow_abbrev=False,
               epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), help="a small named configuration (config.py PRESETS)")
    p.add_argument("--resume", metavar="CKPT", help="continue the run of this ckpt.pt (or run directory) with its "
                   "configuration, in its directory; only these flags may change: "
                   + ", ".join(flag(n) for n in RESUMABLE))
    docs = field_docs(Config)
    for f in dataclasses.fields(Config):
        if f.type is bool:
            p.add_argument(flag(f.name), action=argparse.BooleanOptionalAction,
                           help=f"{docs[f.name]} (default {f.default})")
        else:
            p.add_argument(flag(f.name), type=f.type, metavar=f.type.__name__.upper(),
                           help=f"{docs[f.name]} (default {f.default})")
    args = vars(p.parse_args(argv))
    return args, args.pop("preset", None), args.pop("resume", None)


POSITIVE = ["num_envs", "max_episode_steps", "total_transitions", "start_transitions", "training_steps", "batch_size",
            "num_unroll_steps", "td_steps", "explore_hold", "num_simulations", "lstm_horizon_len", "eval_interval",
            "eval_episodes", "eval_max_episode_steps", "log_interval", "save_interval", "target_refresh_interval",
            "selfplay_refresh_interval", "lr_decay_steps", "channels", "blocks", "reduced_channels", "fc_hidden",
            "lstm_hidden", "support_size", "proj_hid", "proj_out", "pred_hid", "pred_out", "hidden", "latent_dim"]
# float fields: the interval of sensible values, in math notation
RANGES = dict(discount="(0, 1]", lr_init="(0, inf)", lr_warm_up="[0, 1]", lr_decay_rate="(0, 1]", momentum="[0, 1)",
              weight_decay="[0, inf)", max_grad_norm="(0, inf)", value_loss_coeff="[0, inf)",
              policy_loss_coeff="[0, inf)", value_prefix_loss_coeff="[0, inf)", consistency_coeff="[0, inf)",
              priority_alpha="[0, inf)", priority_beta="[0, 1]", priority_eps="(0, inf)", reanalyze_ratio="[0, 1]",
              pb_c_base="(0, inf)", pb_c_init="[0, inf)", root_dirichlet_alpha="(0, inf)",
              root_exploration_fraction="[0, 1]", acting_temperature="[0, inf)", greedy_fraction="[0, 1]",
              value_delta_max="(0, inf)")


def in_interval(value, interval):
    """in_interval(0.5, "(0, 1]") -> True; NaN is in no interval."""
    low, high = (float(x) for x in interval[1:-1].split(", "))
    return ((value >= low) if interval[0] == "[" else (value > low)) and \
        ((value <= high) if interval[-1] == "]" else (value < high))


def check_device(name):
    """-> torch.device for "auto", "cpu", "cuda" or "cuda:N"; UsageError for what this machine cannot run."""
    try:
        device = resolve_device(name)
    except RuntimeError:
        raise UsageError(f"--device {name!r} is not a device name; use auto, cpu or cuda (cuda:N)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name}: this machine has no usable CUDA device (torch {torch.__version__}); "
                             f"use --device cpu, or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {name}: there are {torch.cuda.device_count()} CUDA devices (cuda:0..); "
                             f"pick one of them")
    elif device.type != "cpu":
        raise UsageError(f"--device {name}: only cpu and cuda are supported; use auto, cpu or cuda")
    return device


def check_cpp_compiler():
    """UsageError unless torch.compile finds the C++ compiler it builds CPU kernels with (g++, or $CXX)."""
    from torch._inductor.cpp_builder import get_cpp_compiler
    try:
        get_cpp_compiler()
    except Exception as e:
        raise UsageError(f"--compile on the CPU needs a C++ compiler ({type(e).__name__}: {str(e).splitlines()[0]}); "
                         f"install g++ (or set CXX), or add --no-compile") from None


def check_backend(backend, device):
    if backend not in ("auto", "torch", "triton", "numba"):
        raise UsageError(f"--search-backend {backend!r}: use auto, torch, triton or numba")
    if backend == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise UsageError("--search-backend triton needs a CUDA device (TRITON_INTERPRET=1 runs its kernels on "
                         "the CPU, slowly, for tests); use --search-backend torch or auto")
    if backend == "numba" and device.type != "cpu":
        raise UsageError(f"--search-backend numba runs on the CPU only, not on {device}; use triton or auto")
    if backend in ("triton", "numba") and importlib.util.find_spec(backend) is None:
        raise UsageError(f"--search-backend {backend}: {backend} is not installed; pip install {backend}, or use torch")


def check_config(cfg):
    """Raise UsageError for impossible values; return cfg with the canonical game name."""
    try:
        cfg.game = check_game(cfg.game)
    except ValueError as e:
        raise UsageError(str(e)) from None
    for name in POSITIVE:
        if getattr(cfg, name) < 1:
            raise UsageError(f"{flag(name)} is {getattr(cfg, name)}; it must be at least 1")
    for name in ("last_steps", "torch_threads", "seed", "replay_window", "value_window", "window_td_steps"):
        if getattr(cfg, name) < 0:
            raise UsageError(f"{flag(name)} is {getattr(cfg, name)}; it must be 0 or more")
    if cfg.seed + cfg.num_envs + cfg.eval_episodes + cfg.total_transitions >= 2 ** 31:
        raise UsageError(f"--seed {cfg.seed} is too large: env seeds must stay below 2^31")
    for name, interval in RANGES.items():
        if not in_interval(getattr(cfg, name), interval):
            raise UsageError(f"{flag(name)} is {getattr(cfg, name)}; it must be in {interval}")
    if not cfg.exp_name or os.sep in cfg.exp_name:
        raise UsageError(f"--exp-name {cfg.exp_name!r} names a directory: use a non-empty name without {os.sep}")
    if cfg.start_transitions > cfg.total_transitions - cfg.total_transitions % cfg.num_envs:
        raise UsageError(f"--start-transitions {cfg.start_transitions} exceeds the data budget (--total-transitions "
                         f"{cfg.total_transitions} in steps of {cfg.num_envs} envs): learning could never start; "
                         f"lower the first or raise the second")
    window = cfg.num_envs * (cfg.num_unroll_steps + cfg.td_steps)  # the newest transitions wait for their targets
    if cfg.batch_size > cfg.start_transitions - window:
        raise UsageError(f"--batch-size {cfg.batch_size} is larger than the buffer can give when learning starts "
                         f"(--start-transitions {cfg.start_transitions} minus {window} transitions still waiting "
                         f"for their K + td successors); lower --batch-size or raise --start-transitions")
    if cfg.replay_window and cfg.replay_window < cfg.batch_size:
        raise UsageError(f"--replay-window {cfg.replay_window} is smaller than --batch-size {cfg.batch_size}: "
                         f"raise it, or use 0 (every transition)")
    if cfg.window_td_steps and not cfg.value_window:
        raise UsageError(f"--window-td-steps {cfg.window_td_steps} needs --value-window: it sets the TD horizon of "
                         f"the samples older than the window (with --value-window 0 add --window-td-steps 0)")
    if cfg.bn_stats not in ("depth", "shared"):
        raise UsageError(f"--bn-stats {cfg.bn_stats!r}: use depth or shared")
    if cfg.obs_norm and cfg.game in ALE_GAMES:
        raise UsageError(f"--obs-norm is for vector observations; {cfg.game}'s frames are already scaled to [0, 1]")
    device = check_device(cfg.device)
    check_backend(cfg.search_backend, device)
    if cfg.compile and device.type == "cpu":
        check_cpp_compiler()
    if not cfg.value_prefix:  # the one place the value-prefix ablation acts: zeta = 1 (see README)
        cfg.lstm_horizon_len = 1
    return cfg


def resume_config(ckpt, explicit, path):
    """The checkpoint's configuration with the explicit flags a resume may change (RESUMABLE); UsageError naming
    every other flag that differs from the run's value."""
    base = {k: v for k, v in ckpt["config"].items() if k in {f.name for f in dataclasses.fields(Config)}}
    if "game" in explicit:
        try:
            explicit["game"] = canonical_game(explicit["game"])
        except ValueError as e:
            raise UsageError(str(e)) from None
    refused = [f"{flag(k)} {v} (the run's: {base[k]})" for k, v in explicit.items()
               if k not in RESUMABLE and base.get(k, getattr(Config, k)) != v]
    if refused:
        raise UsageError(f"--resume keeps the run's configuration and these flags would change it: "
                         f"{', '.join(refused)}; drop them (a resume may change only "
                         f"{', '.join(flag(n) for n in RESUMABLE)}), or start a new run")
    cfg = check_config(Config(**{**base, **explicit}))
    done = ckpt["counters"]["updates"]
    if cfg.training_steps + cfg.last_steps <= done:
        raise UsageError(f"{path} is a finished run ({done:,} updates = --training-steps {cfg.training_steps:,} + "
                         f"--last-steps {cfg.last_steps:,}); raise --training-steps or --last-steps to go on")
    return cfg


def model_args(cfg, obs_shape, num_actions):
    """Everything make_model needs, kept in the checkpoint so eval.py rebuilds the network from it alone."""
    if len(obs_shape) == 3:
        names = ["channels", "blocks", "reduced_channels", "fc_hidden"]
    else:
        names = ["hidden", "latent_dim", "obs_norm"]
    names += ["lstm_hidden", "support_size", "proj_hid", "proj_out", "pred_hid", "pred_out", "state_norm"]
    bn_depths = cfg.num_unroll_steps + 1 if cfg.bn_stats == "depth" else 1
    return dict(obs_shape=tuple(obs_shape), num_actions=num_actions, bn_depths=bn_depths,
                **{n: getattr(cfg, n) for n in names})


def resolve_device(name):
    """"auto" -> cuda when available, else cpu; any other name as given (train.py and eval.py --device)."""
    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)


# ---- the checkpoint file: one dict (nanoGPT style), versioned, written atomically ----

CKPT_VERSION = 2  # 1 (no "version" key): before per-depth BatchNorm statistics and the saved running episodes
CKPT_KEYS = {"version", "kind", "model", "target_model", "target_snapshot", "selfplay_model", "optimizer", "scaler",
             "counters", "rng", "config", "model_args", "buffer", "obs"}
MODEL_KEYS = {"model", "config", "model_args", "counters"}  # what eval.py needs, in every version


def save_checkpoint(path, ckpt):
    """torch.save to path.tmp, then rename: a crash or kill during the write leaves the previous file intact."""
    tmp = path + ".tmp"
    try:
        torch.save(ckpt, tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def load_checkpoint(path, map_location="cpu", resume=False):
    """The checkpoint dict at path (a ckpt.pt, or a run directory holding one); UsageError for a missing, truncated
    or foreign file, and with resume=True for one that cannot be resumed (older format, a best.pt)."""
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "ckpt.pt")):
        path = os.path.join(path, "ckpt.pt")
    if not os.path.isfile(path):
        raise UsageError(f"no checkpoint at {path}: pass the ckpt.pt of a run directory (runs/<run>/ckpt.pt)")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:
        reason = (str(e).splitlines() or [type(e).__name__])[0].split(". ")[0][:120]
        raise UsageError(f"{path} is truncated or not a checkpoint ({type(e).__name__}: {reason}); use another "
                         f"ckpt.pt, or start a new run") from None
    if not isinstance(ckpt, dict) or not MODEL_KEYS <= ckpt.keys():
        raise UsageError(f"{path} is not a train.py checkpoint (it lacks the model and its configuration); pass "
                         f"the ckpt.pt of a run directory (runs/<run>/ckpt.pt)")
    version = ckpt.get("version", 1)
    if version > CKPT_VERSION:
        raise UsageError(f"{path} has checkpoint format {version}, newer than this train.py's {CKPT_VERSION}; "
                         f"update this checkout (git pull)")
    if resume and version < CKPT_VERSION:
        raise UsageError(f"{path} was written by an older train.py (checkpoint format {version}, now "
                         f"{CKPT_VERSION}) and cannot be resumed; start a new run (eval.py still evaluates it)")
    if resume and ckpt["kind"] != "last":
        raise UsageError(f"{path} is the run's best evaluation, kept for eval.py; resume from the run's ckpt.pt")
    if version == CKPT_VERSION and ckpt["kind"] == "last" and not CKPT_KEYS <= ckpt.keys():
        raise UsageError(f"{path} is incomplete (it lacks {', '.join(sorted(CKPT_KEYS - ckpt.keys()))}); use "
                         f"another ckpt.pt, or start a new run")
    return ckpt
