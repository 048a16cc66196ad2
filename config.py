"""The configuration of a run: `Config` (the paper's values), presets, the command line, validation,
and the checkpoint file (one dict with the config inside, written atomically).

Paper: Ye et al. 2021, "Mastering Atari Games with Limited Data" (arXiv:2111.00210). Every value in
`Config` cites EZ_SPEC.md (the official code's values, read from its HEAD 468bb03, with sources).
`python train.py --help` prints the fields with these docstrings.
"""

import ast
import argparse
import dataclasses
import inspect
import os
from dataclasses import dataclass

import torch

from atari import canonical_game


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
    """unroll steps past a terminal state learn value 0 and reward 0 whatever the action (an absorbing state, as
    MuZero and the original's first release); off: their value and value-prefix losses are masked, as the
    original's HEAD (EZ_SPEC §0.1.3), so the model never learns what follows a terminal state"""
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
    value_delta_max: float = 0.01
    """floor of max - min in the Q normalization"""
    lstm_horizon_len: int = 5
    """zeta: the value prefix restarts every zeta steps of an unroll or a search path"""
    search_backend: str = "auto"
    """"torch", "triton" or "auto" (triton on CUDA)"""
    cuda_graphs: bool = True
    """on CUDA, record each search's simulation loop in a CUDA graph once per network and search size and replay
    it (mcts.py "CUDA graphs"); --no-cuda-graphs runs it eagerly"""
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
    save_buffer: bool = False
    """store the replay buffer in the checkpoint, so a resumed run loses no data"""


PRESETS = {
    # A quick CPU run of an Atari game: tiny network, few simulations, a few dozen updates.
    "atari-quick": dict(
        channels=16, reduced_channels=4, fc_hidden=16, lstm_hidden=32, proj_hid=64, proj_out=64, pred_hid=32,
        pred_out=64, num_envs=2, num_simulations=4, batch_size=8, total_transitions=400, start_transitions=64,
        training_steps=40, last_steps=8, max_episode_steps=400, eval_interval=30, eval_episodes=2,
        eval_max_episode_steps=60, log_interval=40, save_interval=20),
    # A CPU learning run on CartPole-v1 (MLP model): 2,000 env steps and 2,000 updates, about 3 minutes on 2 cores.
    # Short target/acting refresh intervals for the short run; discount 0.99, near the paper's per agent step
    # (0.997^4 = 0.988): with 0.997 the value flattens and seed 0 never learned (README "Measured").
    "cartpole": dict(
        game="CartPole-v1", max_episode_steps=500, hidden=64, latent_dim=32, lstm_hidden=32, proj_hid=64,
        proj_out=64, pred_hid=32, pred_out=64, support_size=30, state_norm=True, num_envs=8, num_simulations=25,
        batch_size=64, total_transitions=2_000, start_transitions=400, training_steps=2_000, last_steps=0,
        discount=0.99, lr_init=0.2, target_refresh_interval=30, selfplay_refresh_interval=10, eval_interval=250,
        eval_episodes=8, eval_max_episode_steps=500, log_interval=500, save_interval=500, torch_threads=1),
}


class UsageError(Exception):
    """A bad command line or checkpoint: the message names the problem and the fix."""


# ---------------------------------------------------------------------------------------------
# TRY NOT TO MODIFY: command line from Config, validation, checkpoints
# ---------------------------------------------------------------------------------------------

def field_docs(cls):
    """Field name -> the docstring under it (the CleanRL / tyro convention), for --help."""
    body = ast.parse(inspect.getsource(cls)).body[0].body
    return {a.target.id: b.value.value.strip() for a, b in zip(body, body[1:])
            if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant)}


def parse_args(argv=None, description=None):
    """-> (explicit overrides {field: value}, preset name or None, resume path or None)."""
    p = argparse.ArgumentParser(description=description, argument_default=argparse.SUPPRESS)
    p.add_argument("--preset", choices=sorted(PRESETS), help="a small named configuration (PRESETS)")
    p.add_argument("--resume", metavar="CKPT", help="continue the run of this ckpt.pt (its config, its directory)")
    docs = field_docs(Config)
    for f in dataclasses.fields(Config):
        flag, default = "--" + f.name.replace("_", "-"), f.default
        if f.type is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, help=f"{docs[f.name]} (default {default})")
        else:
            p.add_argument(flag, type=f.type, metavar=f.type.__name__.upper(), help=f"{docs[f.name]} (default {default})")
    args = vars(p.parse_args(argv))
    return args, args.pop("preset", None), args.pop("resume", None)


def check_config(cfg):
    """Raise UsageError for impossible values; return cfg with the canonical game name."""
    try:
        cfg.game = canonical_game(cfg.game)
    except ValueError as e:
        raise UsageError(str(e)) from None
    positive = ["num_envs", "max_episode_steps", "total_transitions", "start_transitions", "training_steps",
                "batch_size", "num_unroll_steps", "td_steps", "num_simulations", "lstm_horizon_len", "eval_interval",
                "eval_episodes", "eval_max_episode_steps", "log_interval", "save_interval", "target_refresh_interval",
                "selfplay_refresh_interval", "lr_decay_steps"]
    for name in positive:
        if getattr(cfg, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} is {getattr(cfg, name)}; it must be at least 1")
    if cfg.last_steps < 0:
        raise UsageError(f"--last-steps is {cfg.last_steps}; it must be 0 or more")
    if not 0 < cfg.discount <= 1 or cfg.lr_init <= 0 or not 0 <= cfg.reanalyze_ratio <= 1:
        raise UsageError("need 0 < --discount <= 1, --lr-init > 0 and 0 <= --reanalyze-ratio <= 1")
    if cfg.start_transitions > cfg.total_transitions - cfg.total_transitions % cfg.num_envs:
        raise UsageError(f"--start-transitions {cfg.start_transitions} exceeds the data budget (--total-transitions "
                         f"{cfg.total_transitions} in steps of {cfg.num_envs} envs): learning could never start; "
                         f"lower the first or raise the second")
    window = cfg.num_envs * (cfg.num_unroll_steps + cfg.td_steps)  # the newest transitions wait for their targets
    if cfg.batch_size > cfg.start_transitions - window:
        raise UsageError(f"--batch-size {cfg.batch_size} is larger than the buffer can give when learning starts "
                         f"(--start-transitions {cfg.start_transitions} minus {window} transitions still waiting "
                         f"for their K + td successors); lower --batch-size or raise --start-transitions")
    if cfg.bn_stats not in ("depth", "shared"):
        raise UsageError(f"--bn-stats {cfg.bn_stats!r}: use depth or shared")
    if cfg.search_backend not in ("auto", "torch", "triton"):
        raise UsageError(f"--search-backend {cfg.search_backend!r}: use auto, torch or triton")
    if not cfg.value_prefix:  # the one place the value-prefix ablation acts: zeta = 1 (see README)
        cfg.lstm_horizon_len = 1
    return cfg


def model_args(cfg, obs_shape, num_actions):
    """Everything make_model needs, kept in the checkpoint so eval.py rebuilds the network from it alone."""
    names = ["channels", "blocks", "reduced_channels", "fc_hidden"] if len(obs_shape) == 3 else ["hidden", "latent_dim"]
    names += ["lstm_hidden", "support_size", "proj_hid", "proj_out", "pred_hid", "pred_out", "state_norm"]
    bn_depths = cfg.num_unroll_steps + 1 if cfg.bn_stats == "depth" else 1
    return dict(obs_shape=tuple(obs_shape), num_actions=num_actions, bn_depths=bn_depths,
                **{n: getattr(cfg, n) for n in names})


def save_checkpoint(path, ckpt):
    """torch.save to path.tmp, then rename: a crash never leaves a half-written ckpt.pt."""
    torch.save(ckpt, path + ".tmp")
    os.replace(path + ".tmp", path)


CKPT_KEYS = {"model", "target_model", "target_snapshot", "selfplay_model", "optimizer", "scaler", "counters",
             "rng", "config", "model_args"}


def load_checkpoint(path, map_location="cpu"):
    if not os.path.isfile(path):
        raise UsageError(f"no checkpoint at {path}: pass the ckpt.pt of a run directory (runs/<run>/ckpt.pt)")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:
        raise UsageError(f"checkpoint {path} is corrupt or not a checkpoint ({type(e).__name__}: {e}); "
                         f"use another ckpt.pt, or start a new run") from None
    if not isinstance(ckpt, dict) or not CKPT_KEYS <= ckpt.keys():
        raise UsageError(f"{path} is not a train.py checkpoint (missing {sorted(CKPT_KEYS - set(ckpt))} )"
                         if isinstance(ckpt, dict) else f"{path} is not a train.py checkpoint")
    return ckpt


def resolve_device(name):
    """"auto" -> cuda when available, else cpu; any other name as given (train.py and eval.py --device)."""
    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)
