"""Training targets of EfficientZero, recomputed with the target network when a batch is sampled.

EfficientZero (arXiv:2111.00210) reanalysis as read from the official code, EZ_SPEC.md §5:
- value targets: n-step returns bootstrapped from the target network's value of o_{t+j+l} (§5.2), with the
  TD horizon l shrinking with the age of the data (§5.1, the paper's off-policy correction, value side);
- value-prefix targets: undiscounted reward sums since the last LSTM reset (§5.3);
- policy targets: normalized root visit counts of a fresh noisy search with the target network for the
  first int(B * reanalyze_ratio) samples, the stored self-play distributions for the rest (§5.4).
Everything is batched: one initial_inference over all B * (K+1) bootstrap stacks, one search over all
policy roots (Appendix B.1: the original also searches its 253 x 6 roots at once).

All functions take and return torch tensors on the learner's device (the replay batch is already there).
Shape letters: B batch, K unroll steps, W = K + td_steps, A actions, O obs shape.
"""

from typing import NamedTuple

import torch

from mcts import search, search_kwargs


class Targets(NamedTuple):
    value: torch.Tensor          # [B, K+1] z_{t+j}, j = 0..K
    value_prefix: torch.Tensor   # [B, K] entry k-1 = target of unroll step k
    policy: torch.Tensor         # [B, K+1, A] distributions, 0 past the end
    horizon: torch.Tensor        # [B] int64 TD horizon l of each sample (its mean is logged)


def td_horizon(ages, training_steps, td_steps=5, off_policy_correction=True):
    """TD horizon l per sample from its age = len(buf) - index (EZ_SPEC §5.1). ages [B] -> [B] int64.

    l = clip(td_steps - floor(age / (0.3 * training_steps)), 1, td_steps): 5 below 30k transitions, 4 below
    60k, ... for training_steps = 100k (the original's auto_td_steps = auto_td_steps_ratio * training_steps).
    """
    ages = torch.as_tensor(ages).double()                                  # [B] (the buffer's device)
    if not off_policy_correction:  # ablation: the fixed MuZero horizon (issue #4: "off, l = 5"; the original
        return torch.full_like(ages, td_steps).long()  # divided by training_steps instead, EZ_SPEC §5.1)
    denominator = 0.3 * training_steps
    return (td_steps - torch.floor(ages / denominator)).clamp(1, td_steps).long()


def value_targets(rewards, bootstrap, horizon, episode_left, gamma, K):
    """n-step value targets (EZ_SPEC §5.2). rewards [B, W] clipped r_{t..t+W-1}; bootstrap [B, K+1] the value
    of o_{t+j+l}; horizon [B] l; episode_left [B] transitions from t to its episode's end. -> [B, K+1]

        z_j = sum_{i<l} gamma^i r_{j+i} + gamma^l V(o_{j+l}) [j + l < episode_left],   z_j = 0 if j >= episode_left
    """
    B, W = rewards.shape
    j = torch.arange(K + 1, device=rewards.device)                          # [K+1]
    s = torch.arange(W, device=rewards.device)                              # [W] reward step
    l, left = horizon[:, None], episode_left[:, None]                       # [B, 1]
    rewards = torch.where(s < left, rewards, 0.0)                           # no reward past the end
    d = s[None, :] - j[:, None]                                             # [K+1, W] i = s - j
    window = (d >= 0) & (d < l[:, :, None])                                 # [B, K+1, W] 0 <= i < l
    discounts = torch.where(window, gamma ** d.clamp(min=0).to(rewards.dtype), 0.0)
    z = (discounts * rewards[:, None, :]).sum(-1)                           # [B, K+1] n-step reward sums
    bootstrapped = (j + l) < left                                           # [B, K+1] o_{j+l} inside the episode
    # z_j = 0 for j >= episode_left follows: no rewards there and no bootstrap (j + l >= episode_left)
    return z + torch.where(bootstrapped, gamma ** l.to(rewards.dtype) * bootstrap, 0.0)


def value_prefix_targets(rewards, episode_left, K, lstm_horizon_len):
    """Value-prefix targets (EZ_SPEC §5.3): entry m = sum of r_{t+i} from the last reset to m (included),
    undiscounted; the sum restarts at m = 0, zeta, 2 zeta, ... (zeta = lstm_horizon_len), as the unroll's
    LSTM. Entry k-1 is the target of unroll step k. rewards [B, W], episode_left [B] -> [B, K]"""
    m = torch.arange(K, device=rewards.device)                              # [K]
    r = torch.where(m < episode_left[:, None], rewards[:, :K], 0.0)         # [B, K], past the end: carried
    total = r.cumsum(1)                                                     # [B, K] sum_{i<=m} r_i
    reset = m - m % lstm_horizon_len                                        # [K] first step of m's segment
    before = torch.where(reset > 0, total[:, (reset - 1).clamp(min=0)], 0.0)  # [B, K] sum before the segment
    return total - before


@torch.no_grad()
def reanalyze(batch, buf, target_model, cfg, generator):
    """All targets of a replay Batch from the target network (eval mode, EZ_SPEC §5). -> Targets on the device.

    Search size: only the int(B * reanalyze_ratio) samples whose policy is reanalyzed are searched,
    R * (K+1) roots (the other samples' searches would be thrown away); past-the-end roots are searched
    too (fixed shapes) and their targets zeroed. No host sync: the batch, the buffer and the network share
    the device.
    """
    target_model.eval()                                                     # BN running stats (EZ_SPEC §5)
    K, B = cfg.num_unroll_steps, len(batch.indices)
    device = batch.rewards.device
    search_args = dict(num_simulations=cfg.num_simulations, add_noise=cfg.reanalyze_noise, generator=generator,
                       **search_kwargs(cfg))
    horizon = td_horizon(batch.ages, cfg.training_steps, cfg.td_steps, cfg.off_policy_correction)  # [B]
    if cfg.value_window and cfg.window_td_steps:                            # older samples: a shorter horizon
        horizon = torch.where(batch.ages > cfg.value_window, horizon.clamp(max=cfg.window_td_steps), horizon)
    j = torch.arange(K + 1, device=device)                                  # [K+1]

    # Value (EZ_SPEC §5.2): bootstrap from o_{t+j+l}. Offsets past the end are clamped by buf.stacks and
    # masked in value_targets, so the shapes stay fixed.
    offsets = j[None, :] + horizon[:, None]                                 # [B, K+1]
    bootstrap_obs = buf.stacks(batch.indices[:, None].expand(B, K + 1).reshape(-1), offsets.reshape(-1))
    out = target_model.initial_inference(bootstrap_obs)                     # [B*(K+1), *O]
    if cfg.use_root_value:  # V = root value of a noisy search on o_{t+j+l} (EZ_SPEC §5.2, --use_root_value)
        bootstrap = search(target_model, out, **search_args).root_values    # [B*(K+1)]
    else:                   # V = the target network's value (train.sh default)
        bootstrap = out.value                                               # [B*(K+1)]
    value = value_targets(batch.rewards, bootstrap.float().view(B, K + 1), horizon, batch.episode_left,
                          cfg.discount, K)
    value_prefix = value_prefix_targets(batch.rewards, batch.episode_left, K, cfg.lstm_horizon_len)  # EZ_SPEC §5.3

    # Policy (EZ_SPEC §5.4): a noisy search of o_{t+j} for the first R samples, stored distributions for the rest.
    policy = batch.child_visits.clone()                                     # [B, K+1, A], 0 past the end
    R = int(B * cfg.reanalyze_ratio)
    if R > 0:
        roots = target_model.initial_inference(batch.obs[:R].flatten(0, 1))
        visits = search(target_model, roots, **search_args).visit_counts.float()   # [R*(K+1), A]
        visits = visits.view(R, K + 1, -1)
        alive = (j < batch.episode_left[:R, None])[..., None]               # [R, K+1, 1] o_{t+j} before the end
        policy[:R] = torch.where(alive, visits / visits.sum(-1, keepdim=True), 0.0)
    return Targets(value, value_prefix, policy, horizon)
