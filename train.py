"""EfficientZero training: self-play, prioritized replay, reanalysis, learning, evaluation, checkpoints.

Paper: Ye et al. 2021, "Mastering Atari Games with Limited Data" (arXiv:2111.00210). Every value in
`Config` and every step of the loop cites ../shared/EZ_SPEC.md (read from the official code, HEAD 468bb03).
One process, one device: the E self-play envs are searched in one batched search per step and every
learner batch is reanalyzed in one batched search (../shared/DESIGN.md "Data flow").

    python train.py --game MsPacman                      # the paper's configuration (Atari 100k)
    python train.py --preset cartpole                    # learns CartPole-v1 on a CPU in a few minutes
    python train.py --resume runs/<run>/ckpt.pt          # continue a stopped run
    python train.py --help                               # every field of Config with its source

Shape letters: E envs, B batch, K unroll steps, A actions, S = 2 * support_size + 1 support bins.
"""

import ast
import argparse
import copy
import csv
import dataclasses
import inspect
import json
import os
import random
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.tensorboard import SummaryWriter

from atari import canonical_game, make_env
from mcts import search, search_kwargs, select_action
from model import make_model, scalar_to_support
from reanalyze import reanalyze
from replay import ReplayBuffer


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


def parse_args(argv=None):
    """-> (explicit overrides {field: value}, preset name or None, resume path or None)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], argument_default=argparse.SUPPRESS)
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
    if cfg.search_backend not in ("auto", "torch", "triton"):
        raise UsageError(f"--search-backend {cfg.search_backend!r}: use auto, torch or triton")
    if not cfg.value_prefix:  # the one place the value-prefix ablation acts: zeta = 1 (see README)
        cfg.lstm_horizon_len = 1
    return cfg


def model_args(cfg, obs_shape, num_actions):
    """Everything make_model needs, kept in the checkpoint so eval.py rebuilds the network from it alone."""
    names = ["channels", "blocks", "reduced_channels", "fc_hidden"] if len(obs_shape) == 3 else ["hidden", "latent_dim"]
    names += ["lstm_hidden", "support_size", "proj_hid", "proj_out", "pred_hid", "pred_out", "state_norm"]
    return dict(obs_shape=tuple(obs_shape), num_actions=num_actions, **{n: getattr(cfg, n) for n in names})


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


# ---------------------------------------------------------------------------------------------
# ALGO LOGIC: schedules, augmentation, losses, one learner update
# ---------------------------------------------------------------------------------------------

def learning_rate(step, cfg):
    """Linear warm-up over lr_warm_up * training_steps, then x lr_decay_rate every lr_decay_steps (EZ_SPEC §4.1)."""
    warm_up = int(cfg.lr_warm_up * cfg.training_steps)
    if step < warm_up:
        return cfg.lr_init * step / warm_up
    return cfg.lr_init * cfg.lr_decay_rate ** ((step - warm_up) // cfg.lr_decay_steps)


def visit_softmax_temperature(updates, cfg):
    """Acting temperature 1 / 0.5 / 0.25 at 50% / 75% of training_steps (EZ_SPEC §6, HEAD)."""
    return 1.0 if updates < 0.5 * cfg.training_steps else 0.5 if updates < 0.75 * cfg.training_steps else 0.25


def scale_gradient(x, scale):
    """Multiply the whole gradient arriving at x by scale, also the part from uses before this call
    (a hook, as the original; EZ_SPEC §4.3). The forward value is unchanged."""
    x.register_hook(lambda grad: grad * scale)
    return x


def consistency_loss(online, target):
    """Negative cosine similarity of SimSiam (EZ_SPEC §4.3); no gradient into the target branch. -> [B]"""
    online = F.normalize(online, p=2.0, dim=-1, eps=1e-5)
    target = F.normalize(target.detach(), p=2.0, dim=-1, eps=1e-5)
    return -(online * target).sum(-1)


def cross_entropy(logits, target):
    """Soft-target cross-entropy -sum target log softmax(logits) (EZ_SPEC §2.5). -> [B]"""
    return -(target * F.log_softmax(logits, dim=-1)).sum(-1)


def shift_and_intensity(x, pad=4, scale=0.05):
    """x uint8 [B, C, H, W] -> float [B, C, H, W] in about [0, 1]: replicate-pad `pad` then a random crop
    (clamped indices = replicate padding), and x * (1 + scale * clip(N(0, 1), -2, 2)), one draw per sample
    (EZ_SPEC §4.1, the original's kornia ReplicationPad2d + RandomCrop and Intensity)."""
    B, C, H, W = x.shape
    shift = torch.randint(-pad, pad + 1, (2, B, 1), device=x.device)            # [2, B, 1]
    rows = (torch.arange(H, device=x.device) + shift[0]).clamp(0, H - 1)         # [B, H]
    cols = (torch.arange(W, device=x.device) + shift[1]).clamp(0, W - 1)         # [B, W]
    batch = torch.arange(B, device=x.device)[:, None, None]
    x = x[batch, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)      # [B, C, H, W]
    noise = 1 + scale * torch.randn(B, 1, 1, 1, device=x.device).clamp(-2, 2)    # [B, 1, 1, 1]
    return x.float() / 255 * noise


def augment(obs):
    """obs uint8 [B, K+1, C, H, W]: the input stack o_t gets its own draw; the K target stacks share one
    draw per sample, as the original augments its 8 target frames together (EZ_SPEC §4.3.1)."""
    B, K1, C, H, W = obs.shape
    first = shift_and_intensity(obs[:, 0])                                       # [B, C, H, W]
    rest = shift_and_intensity(obs[:, 1:].reshape(B, (K1 - 1) * C, H, W)).view(B, K1 - 1, C, H, W)
    return torch.cat([first[:, None], rest], 1)                                  # [B, K+1, C, H, W]


def unroll_losses(model, obs, actions, mask, targets, cfg):
    """The K-step unroll of EZ_SPEC §4.3. obs [B, K+1, *O] (stacks o_t..o_{t+K}), actions [B, K], mask [B, K].
    -> per-sample losses [4, B] (value, policy, value prefix, consistency), online value of s_0 [B]."""
    S, K = model.support_size, cfg.num_unroll_steps
    value_target = scalar_to_support(targets.value, S)                          # [B, K+1, S]
    prefix_target = scalar_to_support(targets.value_prefix, S)                  # [B, K, S]
    out = model.initial_inference(obs[:, 0])                                     # s_0 = h(o_t)
    value_loss = cross_entropy(out.value_logits, value_target[:, 0])            # k = 0: unmasked
    policy_loss = cross_entropy(out.policy_logits, targets.policy[:, 0])
    prefix_loss = torch.zeros_like(value_loss)
    consistency = torch.zeros_like(value_loss)
    latent, lstm_state = out.latent, out.lstm_state
    for k in range(1, K + 1):
        step = model.recurrent_inference(latent, lstm_state, actions[:, k - 1])  # s_k, prefix_k, (p_k, v_k)
        latent = scale_gradient(step.latent, 0.5)                               # EZ_SPEC §4.3.3: 0.5 at every s_k
        m = mask[:, k - 1]                                                      # [B]
        value_loss = value_loss + m * cross_entropy(step.value_logits, value_target[:, k])
        policy_loss = policy_loss + m * cross_entropy(step.policy_logits, targets.policy[:, k])
        prefix_loss = prefix_loss + m * cross_entropy(step.value_prefix_logits, prefix_target[:, k - 1])
        if cfg.consistency:  # SimSiam: target = projection of h(o_{t+k}), same online net, stop-gradient
            with torch.no_grad():
                target = model.project(model.initial_inference(obs[:, k]).latent, with_predictor=False)
            consistency = consistency + m * consistency_loss(model.project(latent, with_predictor=True), target)
        lstm_state = step.lstm_state
        if k % cfg.lstm_horizon_len == 0:                                        # EZ_SPEC §4.3.3: prefix restarts
            lstm_state = tuple(torch.zeros_like(s) for s in lstm_state)
    return torch.stack([value_loss, policy_loss, prefix_loss, consistency]), out.value


def train_step(st, batch, targets, cfg):
    """One SGD update (EZ_SPEC §4.3). -> mean losses [4] (a device tensor, no sync)."""
    device = st.device
    obs = torch.as_tensor(batch.obs, device=device)                              # [B, K+1, *O]
    if obs.dim() == 5 and cfg.augmentation:
        obs = augment(obs)
    actions = torch.as_tensor(batch.actions, device=device)                      # [B, K]
    mask = torch.as_tensor(batch.mask, device=device)                            # [B, K]
    weights = torch.as_tensor(batch.weights, device=device)                      # [B] PER importance weights
    coeffs = torch.tensor([cfg.value_loss_coeff, cfg.policy_loss_coeff, cfg.value_prefix_loss_coeff,
                           cfg.consistency_coeff], device=device)
    for group in st.optimizer.param_groups:
        group["lr"] = learning_rate(st.updates, cfg)
    with torch.autocast(device.type, dtype=torch.float16, enabled=st.scaler.is_enabled()):
        losses, value_0 = unroll_losses(st.model, obs, actions, mask, targets, cfg)   # [4, B], [B]
        loss = (weights * (coeffs @ losses.float())).mean()                            # EZ_SPEC §4.3.4
    loss = scale_gradient(loss, 1 / cfg.num_unroll_steps)                       # EZ_SPEC §4.3.5: gradient x 1/K
    st.optimizer.zero_grad(set_to_none=True)
    st.scaler.scale(loss).backward()
    st.scaler.unscale_(st.optimizer)
    torch.nn.utils.clip_grad_norm_(st.model.parameters(), cfg.max_grad_norm)
    st.scaler.step(st.optimizer)
    st.scaler.update()
    priorities = (value_0.detach().float() - targets.value[:, 0]).abs() + cfg.priority_eps  # EZ_SPEC §4.3.7
    st.buf.update_priorities(batch.indices, priorities.cpu().numpy())           # sync point
    st.updates += 1
    return losses.detach().float().mean(1)


def refresh_networks(st, cfg):
    """After update u: acting net <- learner every 100; target <- weights of the previous 200-step point (EZ_SPEC §4.1)."""
    if st.updates % cfg.selfplay_refresh_interval == 0:
        st.selfplay_model.load_state_dict(st.model.state_dict())
    if st.updates % cfg.target_refresh_interval == 0:
        st.target_model.load_state_dict(st.target_snapshot)
        st.target_snapshot = {k: v.detach().clone() for k, v in st.model.state_dict().items()}


# ---------------------------------------------------------------------------------------------
# Self-play and evaluation
# ---------------------------------------------------------------------------------------------

@torch.no_grad()
def run_search(model, obs, cfg, num_simulations, add_noise, generator, tree):
    """One batched search over all envs' observations obs [E, *O] (the model must be in eval mode)."""
    root = model.initial_inference(torch.as_tensor(obs, device=generator.device))
    return search(model, root, num_simulations, add_noise=add_noise, generator=generator, tree=tree,
                  **search_kwargs(cfg))


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


# ---------------------------------------------------------------------------------------------
# Run state: networks, optimizer, buffer, counters, random generators (all of it goes in ckpt.pt)
# ---------------------------------------------------------------------------------------------

def build(cfg, env, device):
    """Fresh run state for cfg and env's shapes."""
    args = model_args(cfg, env.obs_shape, env.num_actions)
    model = make_model(**args).to(device)
    return argparse.Namespace(
        device=device, model_args=args, model=model.train(),
        target_model=copy.deepcopy(model).eval(),              # reanalysis (EZ_SPEC §5), lags 200-400 updates
        target_snapshot={k: v.detach().clone() for k, v in model.state_dict().items()},
        selfplay_model=copy.deepcopy(model).eval(),            # acting (EZ_SPEC §6), refreshed every 100 updates
        optimizer=torch.optim.SGD(model.parameters(), lr=0.0, momentum=cfg.momentum, weight_decay=cfg.weight_decay),
        scaler=torch.amp.GradScaler(device.type, enabled=cfg.amp and device.type == "cuda"),
        buf=ReplayBuffer(cfg.total_transitions, cfg.num_envs, env.frame_shape, env.stack, env.num_actions,
                         alpha=cfg.priority_alpha, frame_dtype=np.uint8 if env.is_atari else np.float32,
                         device=device),                    # frames on the training device: stacks gathered there
        generator=torch.Generator(device).manual_seed(cfg.seed),   # search noise, tie-breaks, action sampling
        rng=np.random.default_rng(cfg.seed),                       # replay sampling, random warm-up actions
        env_steps=0, updates=0, games=0, elapsed=0.0, last_eval=float("nan"))


COUNTERS = ("env_steps", "updates", "games", "elapsed", "last_eval")


def checkpoint(st, cfg, obs):
    """Everything a resumed run needs (nanoGPT-style single dict); obs [E, *O] ends the running episodes."""
    cuda = st.device.type == "cuda"
    return dict(
        model=st.model.state_dict(), target_model=st.target_model.state_dict(), target_snapshot=st.target_snapshot,
        selfplay_model=st.selfplay_model.state_dict(), optimizer=st.optimizer.state_dict(),
        scaler=st.scaler.state_dict(), counters={k: getattr(st, k) for k in COUNTERS},
        rng=dict(python=random.getstate(), numpy=np.random.get_state(), torch=torch.get_rng_state(),
                 cuda=torch.cuda.get_rng_state_all() if cuda else None, search=st.generator.get_state(),
                 replay=st.rng.bit_generator.state),
        config=dataclasses.asdict(cfg), model_args=st.model_args,
        buffer=st.buf.state_dict() if cfg.save_buffer else None, obs=obs if cfg.save_buffer else None)


def restore(st, ckpt):
    """Load a checkpoint dict into a run state made by build()."""
    for name in ("model", "target_model", "selfplay_model", "optimizer", "scaler"):
        getattr(st, name).load_state_dict(ckpt[name])
    st.target_snapshot = {k: v.to(st.device) for k, v in ckpt["target_snapshot"].items()}
    for k in COUNTERS:
        setattr(st, k, ckpt["counters"][k])
    rng = ckpt["rng"]
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] is not None and st.device.type == "cuda":
        torch.cuda.set_rng_state_all(rng["cuda"])
    st.generator.set_state(rng["search"])
    st.rng.bit_generator.state = rng["replay"]
    if ckpt["buffer"] is not None:
        st.buf.load_state_dict(ckpt["buffer"])
        st.buf.end_running_episodes(ckpt["obs"])


# ---------------------------------------------------------------------------------------------
# The loop: collect, store, reanalyze, learn, refresh, evaluate, log, checkpoint
# ---------------------------------------------------------------------------------------------

LOSSES = ("value", "policy", "value_prefix", "consistency")
METRICS = ("env_steps", "updates", "time", "env_steps_per_s", "updates_per_s", *(f"loss_{n}" for n in LOSSES),
           "episode_return", "eval_return", "learning_rate", "td_horizon", "buffer_size")


def collect_now(st, cfg):
    """Data pacing (EZ_SPEC §6): self-play until learning can start, then only while
    env_steps / total_transitions <= updates / training_steps; no data after training_steps or the budget."""
    if st.updates >= cfg.training_steps or st.env_steps + cfg.num_envs > cfg.total_transitions:
        return False
    return len(st.buf) < cfg.start_transitions or st.env_steps * cfg.training_steps <= st.updates * cfg.total_transitions


def selfplay_step(st, env, obs, tree, cfg):
    """One lockstep step of the E envs, chosen by one batched search with root noise (EZ_SPEC §6); stores the
    transitions. -> next obs [E, *O], the search tree (reused), raw scores of the games that ended."""
    result = run_search(st.selfplay_model, obs, cfg, cfg.num_simulations, True, st.generator, tree)
    if st.updates == 0:  # before learning: uniform random actions and uniform policy targets (EZ_SPEC §6)
        actions = st.rng.integers(env.num_actions, size=cfg.num_envs)
        visit_dist = np.full((cfg.num_envs, env.num_actions), 1 / env.num_actions, np.float32)
    else:
        temperature = visit_softmax_temperature(st.updates, cfg)
        actions = select_action(result.visit_counts, temperature, st.generator, deterministic=False)
        actions = actions.cpu().numpy()                                             # sync point
        visit_dist = (result.visit_counts / cfg.num_simulations).cpu().numpy()      # [E, A] targets at T = 1
    next_obs, reward, done, info = env.step(actions)
    st.buf.add(obs, actions, reward, done, result.root_values.cpu().numpy(), visit_dist, info["final_obs"])
    st.env_steps += cfg.num_envs
    return next_obs, result.tree, info["episode_return"][info["game_over"]]


def learner_step(st, cfg):
    """Sample (PER, beta 0.4 -> 1), targets from the target network, one update, network refreshes
    (EZ_SPEC §4, §5). -> mean losses [4], mean TD horizon (device tensors)."""
    beta = cfg.priority_beta + (1 - cfg.priority_beta) * st.updates / (cfg.training_steps + cfg.last_steps)
    batch = st.buf.sample(cfg.batch_size, cfg.num_unroll_steps, cfg.td_steps, beta, st.rng)
    targets = reanalyze(batch, st.buf, st.target_model, cfg, st.generator, st.device)
    losses = train_step(st, batch, targets, cfg)
    refresh_networks(st, cfg)
    return losses, targets.horizon.float().mean()


def evaluate_and_log(st, cfg, run_dir, writer, elapsed):
    """Evaluate the learner's network; append a row to eval.csv: env steps, updates, seconds since the run started
    (earlier evaluations included), mean, std, then every game's score separated by spaces."""
    scores, _ = evaluate(st.model, cfg, cfg.eval_episodes, cfg.seed + cfg.num_envs, cfg.eval_max_episode_steps,
                         cfg.num_simulations)
    st.last_eval = float(scores.mean())
    writer.add_scalar("eval/episodic_return", st.last_eval, st.env_steps)
    with open(os.path.join(run_dir, "eval.csv"), "a") as f:
        f.write(f"{st.env_steps},{st.updates},{elapsed:.1f},{scores.mean():.2f},{scores.std():.2f},"
                + " ".join(f"{s:g}" for s in scores) + "\n")
    print(f"eval at update {st.updates:,}, env step {st.env_steps:,}, {elapsed:.0f} s: {scores.mean():.1f} +- "
          f"{scores.std():.1f} over {len(scores)} games", flush=True)


def train(cfg, ckpt=None, run_dir=None):
    """Run (or, given a checkpoint dict and its directory, continue) a training run. -> the run directory."""
    device = resolve_device(cfg.device)
    if cfg.torch_threads:
        torch.set_num_threads(cfg.torch_threads)
    random.seed(cfg.seed)  # seeding once (CleanRL); a resumed run restores every state below instead
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    resumed_at = ckpt["counters"]["env_steps"] if ckpt else 0   # a resumed run reseeds its envs seed + i + env_steps
    env = make_env(cfg.game, cfg.num_envs, cfg.seed + resumed_at, train=True, max_episode_steps=cfg.max_episode_steps)
    st = build(cfg, env, device)
    if ckpt:
        restore(st, ckpt)
    run_dir = run_dir or os.path.join(cfg.runs_dir, f"{cfg.game}__{cfg.exp_name}__{cfg.seed}__{int(time.time())}")
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "config.json"), "w") as f:
        json.dump(dataclasses.asdict(cfg), f, indent=2)
    writer = SummaryWriter(run_dir)
    writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" +
                    "\n".join(f"|{k}|{v}|" for k, v in dataclasses.asdict(cfg).items()))
    new_csv = not os.path.exists(os.path.join(run_dir, "metrics.csv"))
    metrics_file = open(os.path.join(run_dir, "metrics.csv"), "a", newline="")
    metrics = csv.DictWriter(metrics_file, METRICS)
    if new_csv:
        metrics.writeheader()
    print(f"{'resumed' if ckpt else 'started'} {run_dir} on {device}: {cfg.game}, {env.num_actions} actions, "
          f"{sum(p.numel() for p in st.model.parameters()):,} parameters, update {st.updates:,}, "
          f"env step {st.env_steps:,}, buffer {len(st.buf):,}", flush=True)

    total_updates = cfg.training_steps + cfg.last_steps
    obs, tree = env.reset(), None                                                   # [E, *O]
    loss_sum, td_sum, num_updates, returns = torch.zeros(4, device=device), torch.zeros((), device=device), 0, []
    t_start = t_log = time.time()
    elapsed0, log_env, log_upd = st.elapsed, st.env_steps, st.updates
    log_tick = (st.env_steps + st.updates) // cfg.log_interval
    while st.updates < total_updates:
        if collect_now(st, cfg):
            # ALGO LOGIC: self-play, one batched search for all E envs
            obs, tree, scores = selfplay_step(st, env, obs, tree, cfg)
            for score in scores:
                returns.append(score)
                st.games += 1
                writer.add_scalar("charts/episodic_return", score, st.env_steps)
        elif len(st.buf) >= cfg.start_transitions:
            # ALGO LOGIC: reanalyze a prioritized batch with the target network, learn, refresh
            losses, horizon = learner_step(st, cfg)
            loss_sum, td_sum, num_updates = loss_sum + losses, td_sum + horizon, num_updates + 1
            if st.updates % cfg.eval_interval == 0 or st.updates == total_updates:
                evaluate_and_log(st, cfg, run_dir, writer, elapsed0 + time.time() - t_start)
            if st.updates % cfg.save_interval == 0 or st.updates == total_updates:
                st.elapsed = elapsed0 + time.time() - t_start
                save_checkpoint(os.path.join(run_dir, "ckpt.pt"), checkpoint(st, cfg, obs))
        else:
            raise UsageError(f"the buffer holds {len(st.buf)} < {cfg.start_transitions} transitions and the data "
                             f"budget is spent: resume from a checkpoint saved with --save-buffer")

        tick = (st.env_steps + st.updates) // cfg.log_interval
        if tick > log_tick or st.updates == total_updates:  # TRY NOT TO MODIFY: progress line, TensorBoard, csv
            log_tick, now = tick, time.time()
            dt = max(now - t_log, 1e-9)
            row = dict(env_steps=st.env_steps, updates=st.updates, time=round(elapsed0 + now - t_start, 1),
                       env_steps_per_s=(st.env_steps - log_env) / dt, updates_per_s=(st.updates - log_upd) / dt,
                       episode_return=np.mean(returns) if returns else float("nan"), eval_return=st.last_eval,
                       learning_rate=learning_rate(st.updates, cfg), buffer_size=len(st.buf),
                       td_horizon=(td_sum / max(num_updates, 1)).item())                     # sync point
            row.update({f"loss_{n}": v for n, v in zip(LOSSES, (loss_sum / max(num_updates, 1)).tolist())})
            for k, v in row.items():
                if k not in ("env_steps", "time"):
                    writer.add_scalar(("losses/" if k.startswith("loss") else "charts/") + k, v, st.env_steps)
            metrics.writerow({k: f"{v:.6g}" if isinstance(v, float) else v for k, v in row.items()})
            metrics_file.flush()
            left = (total_updates - st.updates) / row["updates_per_s"] if row["updates_per_s"] > 0 else float("nan")
            print(f"env {st.env_steps:,} | upd {st.updates:,} | {row['env_steps_per_s']:.1f} env/s "
                  f"{row['updates_per_s']:.2f} upd/s | loss v {row['loss_value']:.3f} p {row['loss_policy']:.3f} "
                  f"r {row['loss_value_prefix']:.3f} c {row['loss_consistency']:.3f} | return "
                  f"{row['episode_return']:.1f} | eval {st.last_eval:.1f} | lr {row['learning_rate']:.4f} | "
                  f"td {row['td_horizon']:.2f} | buf {len(st.buf):,} | left "
                  + (time.strftime("%H:%M:%S", time.gmtime(left)) if np.isfinite(left) else "?"), flush=True)
            t_log, log_env, log_upd, returns = now, st.env_steps, st.updates, []
            loss_sum, td_sum, num_updates = torch.zeros_like(loss_sum), torch.zeros_like(td_sum), 0
    env.close()
    writer.close()
    metrics_file.close()
    return run_dir


def main(argv=None):
    explicit, preset, resume = parse_args(argv)
    ckpt, base = None, {}
    if resume:
        ckpt = load_checkpoint(resume)
        base = {k: v for k, v in ckpt["config"].items() if k in {f.name for f in dataclasses.fields(Config)}}
        if "game" in explicit:
            try:
                game = canonical_game(explicit["game"])
            except ValueError as e:
                raise UsageError(str(e)) from None
            if game != base["game"]:
                raise UsageError(f"{resume} is a run of {base['game']}, not {game}: drop --game, or start a new "
                                 f"run of {game} without --resume")
    cfg = check_config(Config(**{**base, **PRESETS.get(preset, {}), **explicit}))
    return train(cfg, ckpt, os.path.dirname(resume) if resume else None)


if __name__ == "__main__":
    try:
        main()
    except UsageError as e:
        sys.exit(f"train.py: error: {e}")
