"""EfficientZero networks and the categorical support transforms.

Paper: Ye et al. 2021, "Mastering Atari Games with Limited Data" (arXiv:2111.00210).
Layer list, constants and transforms follow EZ_SPEC.md §2 (read from the official code).

    representation  h(o)          : obs [B, 12, 96, 96] -> latent s [B, 64, 6, 6]          (EZ_SPEC §2.1)
    dynamics        g(s, a, lstm) : -> s' [B, 64, 6, 6], value prefix logits [B, S], lstm  (EZ_SPEC §2.2)
    prediction      f(s)          : -> policy logits [B, A], value logits [B, S]          (EZ_SPEC §2.3)
    projection / projection_head  : SimSiam branches of the consistency loss              (EZ_SPEC §2.4)

Shape letters: B batch, A actions, S = 2 * support_size + 1 support bins, H LSTM hidden size.
`MLPNet` has the same interface for vector observations (quick CPU runs on CartPole & co).

Depth. Every BatchNorm of the dynamics and prediction networks keeps its running statistics per unroll
depth 0..K (`bn_depths` = K + 1 sets; README "Differences"): the learner normalizes unroll step k with the
batch statistics of that step, so inference at depth d (a search node d steps below its root) uses the
statistics of depth min(d, K), not one average over all depths as the original (bn_depths = 1, the
`--bn-stats shared` switch). The representation and the SimSiam projection keep one set (depth 0).
`recurrent_inference(latent, lstm_state, action, depth)` takes the depth of the latent it makes: an int
(the learner's unroll) or a [B] int tensor (a search step, whose nodes sit at different depths).
"""

from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


# ---------------------------------------------------------------------------------------------
# Scalar <-> categorical transforms (EZ_SPEC §2.5). Pure, vectorised, dtype-generic.
# ---------------------------------------------------------------------------------------------

def scalar_transform(x: torch.Tensor, eps: float = 0.001) -> torch.Tensor:
    """h(x) = sign(x)(sqrt(|x| + 1) - 1) + eps x  (Pohlen et al. 2018, arXiv:1805.11593; EZ HEAD)."""
    return torch.sign(x) * (torch.sqrt(torch.abs(x) + 1) - 1) + eps * x


def inverse_scalar_transform(y: torch.Tensor, eps: float = 0.001) -> torch.Tensor:
    """h^-1(y) = sign(y)(((sqrt(1 + 4 eps (|y| + 1 + eps)) - 1) / (2 eps))^2 - 1), exact inverse of h."""
    return torch.sign(y) * (((torch.sqrt(1 + 4 * eps * (torch.abs(y) + 1 + eps)) - 1) / (2 * eps)) ** 2 - 1)


def scalar_to_support(x: torch.Tensor, support_size: int) -> torch.Tensor:
    """phi(h(x)): two-hot over the integer support [-S, S]. x [...] -> [..., 2S+1]."""
    y = scalar_transform(x).clamp(-support_size, support_size)
    low = y.floor()
    p_high = y - low                                                   # weight of the upper bin
    idx_low = (low + support_size).long()                              # [...]
    idx_high = (idx_low + 1).clamp(max=2 * support_size)               # p_high is 0 when clamped
    out = torch.zeros(*x.shape, 2 * support_size + 1, dtype=x.dtype, device=x.device)
    out.scatter_add_(-1, idx_high.unsqueeze(-1), p_high.unsqueeze(-1))
    out.scatter_add_(-1, idx_low.unsqueeze(-1), (1 - p_high).unsqueeze(-1))
    return out


def support_to_scalar(logits: torch.Tensor, support_size: int) -> torch.Tensor:
    """h^-1 of the expectation of softmax(logits) over [-S, S]. logits [..., 2S+1] -> [...]."""
    support = torch.arange(-support_size, support_size + 1, dtype=logits.dtype, device=logits.device)
    expectation = (torch.softmax(logits, dim=-1) * support).sum(-1)
    out = torch.nan_to_num(inverse_scalar_transform(expectation), nan=0.0)
    return torch.where(out.abs() < 0.001, torch.zeros_like(out), out)  # as the original: |v| < eps -> 0


# ---------------------------------------------------------------------------------------------
# Outputs shared by both networks
# ---------------------------------------------------------------------------------------------

class NetworkOutput(NamedTuple):
    latent: torch.Tensor                           # [B, *latent_shape]
    lstm_state: tuple                              # (h, c), each [B, H]
    value_prefix: Optional[torch.Tensor]           # [B] scalar; 0 at the root; None if scalars=False
    value: Optional[torch.Tensor]                  # [B] scalar; None if scalars=False
    policy_logits: torch.Tensor                    # [B, A]
    value_prefix_logits: Optional[torch.Tensor]    # [B, S]; None from initial_inference
    value_logits: torch.Tensor                     # [B, S]


class DepthBatchNorm(nn.Module):
    """BatchNorm (1d or 2d) with `depths` sets of running statistics, one per unroll depth.

    Training normalizes with the batch's own statistics, as nn.BatchNorm, and updates the set of the depth
    it is given (an int: every sample of a learner batch is at the same unroll step). Inference normalizes
    a sample at depth d with set min(d, depths - 1); depth is an int or a [B] int tensor (gathered per
    sample, no host sync). depths = 1 is nn.BatchNorm (momentum 0.1, eps 1e-5, as EZ_SPEC §2).
    """

    def __init__(self, num_features, depths=1, eps=1e-5, momentum=0.1):
        super().__init__()
        self.depths, self.eps, self.momentum = depths, eps, momentum
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(depths, num_features))   # [depths, C]
        self.register_buffer("running_var", torch.ones(depths, num_features))     # [depths, C]

    def forward(self, x, depth=0):                                     # x [B, C] or [B, C, H, W]
        if isinstance(depth, int):
            d = min(depth, self.depths - 1)
            if self.training:   # the running statistics move in place, and F.batch_norm bumps no tensor version:
                self._scale_shift_key = None    # forget the inference table (a write only: torch.compile keeps it)
            return F.batch_norm(x, self.running_mean[d], self.running_var[d], self.weight, self.bias,
                                self.training, self.momentum, self.eps)  # updates row d in place when training
        if self.training:
            raise ValueError("DepthBatchNorm: per-sample depths are for inference; train with an int depth")
        scale_shift = self.scale_shift().index_select(0, depth.clamp(max=self.depths - 1))  # [B, 2C]
        view = (x.shape[0], x.shape[1]) + (1,) * (x.dim() - 2)
        scale, shift = scale_shift[:, :x.shape[1]].view(view), scale_shift[:, x.shape[1]:].view(view)
        return torch.addcmul(shift, x, scale)                          # x * scale + shift

    @torch.no_grad()
    def scale_shift(self):
        """[depths, 2C]: the inference BatchNorm of each depth as x * scale + shift (scales, then shifts).

        A search calls every BatchNorm once per simulation with the same statistics, so the table is kept and
        reused while the statistics and affine parameters are the same tensors at the same versions (an optimizer
        step or load_state_dict bumps them) and no training pass moved the statistics. Inside a CUDA graph capture
        it is computed in the graph and not kept, so that a replay reads the parameters as they are then (they are
        refreshed in place). No gradient."""
        capturing = self.weight.is_cuda and torch.cuda.is_current_stream_capturing()
        tensors = (self.running_mean, self.running_var, self.weight, self.bias)
        key = tuple((t.data_ptr(), t._version) for t in tensors)
        if capturing or getattr(self, "_scale_shift_key", None) != key:
            scale = self.weight * torch.rsqrt(self.running_var + self.eps)           # [depths, C]
            table = torch.cat([scale, self.bias - self.running_mean * scale], 1)   # [depths, 2C]
            if capturing:
                return table
            self._scale_shift, self._scale_shift_key = table, key
        return self._scale_shift

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """A state dict of nn.BatchNorm (one [C] set, from checkpoints written before the per-depth
        statistics) loads with that set copied to every depth."""
        state_dict.pop(prefix + "num_batches_tracked", None)
        for name in ("running_mean", "running_var"):
            value = state_dict.get(prefix + name)
            if value is not None and value.dim() == 1:
                state_dict[prefix + name] = value.expand(self.depths, -1).clone()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class MLP(nn.Sequential):
    """Linear-BN-ReLU for every hidden layer, then a plain Linear (optionally zero-initialised, or followed
    by BN; optionally BN first, on the input); its BatchNorms keep `depths` sets of statistics and
    forward(x, depth) picks one."""

    def __init__(self, sizes, depths=1, last_zero_init=False, last_bn=False, first_bn=False):
        layers = [DepthBatchNorm(sizes[0], depths)] if first_bn else []
        for i in range(len(sizes) - 2):
            layers += [nn.Linear(sizes[i], sizes[i + 1]), DepthBatchNorm(sizes[i + 1], depths), nn.ReLU()]
        last = nn.Linear(sizes[-2], sizes[-1])
        if last_zero_init:  # EZ_SPEC §2.3: value, value prefix and policy outputs start at 0 / uniform
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)
        layers.append(last)
        if last_bn:
            layers.append(DepthBatchNorm(sizes[-1], depths))
        super().__init__(*layers)

    def forward(self, x, depth=0):
        for layer in self:
            x = layer(x, depth) if isinstance(layer, DepthBatchNorm) else layer(x)
        return x


def normalize_state(s: torch.Tensor) -> torch.Tensor:
    """Per-sample min-max scaling to [0, 1] (the original's optional `state_norm`, off for Atari)."""
    flat = s.flatten(1)
    lo, hi = flat.min(1, keepdim=True).values, flat.max(1, keepdim=True).values
    return ((flat - lo) / (hi - lo).clamp(min=1e-5)).view_as(s)


class _Inference(nn.Module):
    """initial_inference / recurrent_inference / project on top of representation, dynamics, prediction."""

    def initial_inference(self, obs: torch.Tensor) -> NetworkOutput:
        latent = self.encode(obs)
        policy_logits, value_logits = self.prediction(latent, 0)
        B = latent.shape[0]
        zeros = latent.new_zeros(B, self.lstm_hidden)
        return NetworkOutput(latent, (zeros, zeros.clone()), latent.new_zeros(B),
                             support_to_scalar(value_logits, self.support_size), policy_logits, None, value_logits)

    def encode(self, obs: torch.Tensor) -> torch.Tensor:
        """s_0 = h(o): the representation alone (also the consistency loss's target branch)."""
        if obs.dtype == torch.uint8:
            obs = obs.float() / 255.0                                  # EZ_SPEC §1: pixels / 255
        latent = self.representation(obs)
        return normalize_state(latent) if self.state_norm else latent

    def recurrent_inference(self, latent, lstm_state, action, depth, scalars=True) -> NetworkOutput:
        """One dynamics step and the prediction of the new latent, at `depth` (int or [B]) = its depth.
        scalars=False leaves value_prefix and value None: the learner's unroll reads only the logits, and the
        two support_to_scalar calls were about an eighth of a CartPole update."""
        next_latent, value_prefix_logits, lstm_state = self.dynamics(latent, action, lstm_state, depth)
        if self.state_norm:
            next_latent = normalize_state(next_latent)
        policy_logits, value_logits = self.prediction(next_latent, depth)
        value_prefix = support_to_scalar(value_prefix_logits, self.support_size) if scalars else None
        value = support_to_scalar(value_logits, self.support_size) if scalars else None
        return NetworkOutput(next_latent, lstm_state, value_prefix, value, policy_logits, value_prefix_logits,
                             value_logits)

    def project(self, latent: torch.Tensor, with_predictor: bool) -> torch.Tensor:
        """SimSiam branches (EZ_SPEC §2.4): projection, plus the predictor on the online branch only."""
        proj = self.projection(latent.flatten(1))                     # [B, proj_out]
        return self.projection_head(proj) if with_predictor else proj


# ---------------------------------------------------------------------------------------------
# Atari: the convolutional network (EZ_SPEC §2)
# ---------------------------------------------------------------------------------------------

def conv3x3(c_in, c_out, stride=1):
    return nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)


class ResidualBlock(nn.Module):
    """conv(s)-BN-ReLU-conv-BN, + shortcut (identity or `downsample`), ReLU."""

    def __init__(self, c_in, c_out, stride=1, downsample=None, depths=1):
        super().__init__()
        self.conv1, self.bn1 = conv3x3(c_in, c_out, stride), DepthBatchNorm(c_out, depths)
        self.conv2, self.bn2 = conv3x3(c_out, c_out), DepthBatchNorm(c_out, depths)
        self.downsample = downsample

    def forward(self, x, depth=0):
        out = F.relu(self.bn1(self.conv1(x), depth))
        out = self.bn2(self.conv2(out), depth)
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(out + shortcut)


class Representation(nn.Module):
    """12x96x96 -> 64x6x6 (EZ_SPEC §2.1, steps 1-8)."""

    def __init__(self, in_channels, channels, blocks):
        super().__init__()
        half = channels // 2
        self.conv = conv3x3(in_channels, half, stride=2)               # -> [B, 32, 48, 48]
        self.bn = DepthBatchNorm(half)
        self.res1 = ResidualBlock(half, half)
        self.res2 = ResidualBlock(half, channels, stride=2,            # -> [B, 64, 24, 24]
                                  downsample=conv3x3(half, channels, stride=2))  # shortcut conv, no BN
        self.res3 = ResidualBlock(channels, channels)
        self.pool1 = nn.AvgPool2d(3, stride=2, padding=1)              # -> [B, 64, 12, 12]
        self.res4 = ResidualBlock(channels, channels)
        self.pool2 = nn.AvgPool2d(3, stride=2, padding=1)              # -> [B, 64, 6, 6]
        self.blocks = nn.Sequential(*[ResidualBlock(channels, channels) for _ in range(blocks)])

    def forward(self, obs):                                            # obs [B, 12, 96, 96] in [0, 1]
        x = F.relu(self.bn(self.conv(obs)))
        x = self.pool1(self.res3(self.res2(self.res1(x))))
        x = self.pool2(self.res4(x))
        return self.blocks(x)                                          # [B, 64, 6, 6]


class Dynamics(nn.Module):
    """(s, a, lstm) -> (s', value prefix logits, lstm') (EZ_SPEC §2.2)."""

    def __init__(self, channels, num_actions, spatial, reduced_channels, fc_hidden, lstm_hidden, support_bins,
                 depths):
        super().__init__()
        self.num_actions = num_actions
        self.conv = conv3x3(channels + 1, channels)                    # 65 -> 64
        self.bn = DepthBatchNorm(channels, depths)
        self.res = ResidualBlock(channels, channels, depths=depths)
        self.conv1x1_value_prefix = nn.Conv2d(channels, reduced_channels, 1)   # with bias
        self.bn_value_prefix = DepthBatchNorm(reduced_channels, depths)
        self.lstm = nn.LSTMCell(reduced_channels * spatial * spatial, lstm_hidden)  # 576 -> 512, one step per call
        self.bn_lstm = DepthBatchNorm(lstm_hidden, depths)
        self.fc = MLP([lstm_hidden, fc_hidden, support_bins], depths, last_zero_init=True)  # 512 -> 32 -> 601

    def forward(self, state, action, lstm_state, depth):
        B, C, Hs, Ws = state.shape
        # The action is one constant plane a / |A|, not a one-hot (EZ_SPEC §2.2).
        plane = (action.to(state.dtype) / self.num_actions).view(B, 1, 1, 1).expand(B, 1, Hs, Ws)
        x = self.bn(self.conv(torch.cat([state, plane], dim=1)), depth)  # [B, 64, 6, 6]
        x = F.relu(x + state)                                          # residual on the state path
        next_state = self.res(x, depth)
        x = F.relu(self.bn_value_prefix(self.conv1x1_value_prefix(next_state), depth)).flatten(1)  # [B, 576]
        h, c = self.lstm(x, lstm_state)                                # [B, 512] each
        value_prefix_logits = self.fc(F.relu(self.bn_lstm(h, depth)), depth)  # [B, S]
        return next_state, value_prefix_logits, (h, c)


class Prediction(nn.Module):
    """s -> (policy logits, value logits) (EZ_SPEC §2.3)."""

    def __init__(self, channels, num_actions, spatial, reduced_channels, fc_hidden, support_bins, depths):
        super().__init__()
        flat = reduced_channels * spatial * spatial                   # 16 * 6 * 6 = 576
        self.res = ResidualBlock(channels, channels, depths=depths)
        self.conv1x1_value = nn.Conv2d(channels, reduced_channels, 1)
        self.bn_value = DepthBatchNorm(reduced_channels, depths)
        self.fc_value = MLP([flat, fc_hidden, support_bins], depths, last_zero_init=True)
        self.conv1x1_policy = nn.Conv2d(channels, reduced_channels, 1)
        self.bn_policy = DepthBatchNorm(reduced_channels, depths)
        self.fc_policy = MLP([flat, fc_hidden, num_actions], depths, last_zero_init=True)

    def forward(self, state, depth):
        x = self.res(state, depth)
        value = F.relu(self.bn_value(self.conv1x1_value(x), depth)).flatten(1)
        policy = F.relu(self.bn_policy(self.conv1x1_policy(x), depth)).flatten(1)
        return self.fc_policy(policy, depth), self.fc_value(value, depth)  # [B, A], [B, S]


class EfficientZeroNet(_Inference):
    """The Atari network. Defaults are the paper's (EZ_SPEC §2); shrink them for CPU runs."""

    def __init__(self, obs_shape=(12, 96, 96), num_actions=18, channels=64, blocks=1, reduced_channels=16,
                 fc_hidden=32, lstm_hidden=512, support_size=300, proj_hid=1024, proj_out=1024,
                 pred_hid=512, pred_out=1024, state_norm=False, bn_depths=6):
        super().__init__()
        spatial = -(-obs_shape[1] // 16)                               # 96 -> 6 (two stride-2 convs, two pools)
        bins = 2 * support_size + 1
        self.num_actions, self.support_size, self.lstm_hidden = num_actions, support_size, lstm_hidden
        self.latent_shape, self.state_norm = (channels, spatial, spatial), state_norm
        self.representation = Representation(obs_shape[0], channels, blocks)
        self.dynamics = Dynamics(channels, num_actions, spatial, reduced_channels, fc_hidden, lstm_hidden, bins,
                                 bn_depths)
        self.prediction = Prediction(channels, num_actions, spatial, reduced_channels, fc_hidden, bins, bn_depths)
        latent_size = channels * spatial * spatial                    # 2304
        # Projection 2304 -> 1024 -> 1024 -> 1024 (BN, no ReLU at the end); predictor 1024 -> 512 -> 1024.
        self.projection = MLP([latent_size, proj_hid, proj_hid, proj_out], last_bn=True)
        self.projection_head = MLP([proj_out, pred_hid, pred_out])


# ---------------------------------------------------------------------------------------------
# Vector observations: the same structure with MLPs (for CartPole-sized tasks on CPU)
# ---------------------------------------------------------------------------------------------

class MLPDynamics(nn.Module):
    """(s, a, lstm) -> (s', value prefix logits, lstm'). The action enters as a one-hot."""

    def __init__(self, latent_dim, num_actions, hidden, lstm_hidden, support_bins, depths):
        super().__init__()
        self.num_actions = num_actions
        self.fc = nn.Linear(latent_dim + num_actions, latent_dim)
        self.bn = DepthBatchNorm(latent_dim, depths)
        self.res = MLP([latent_dim, hidden, latent_dim], depths)
        self.lstm = nn.LSTMCell(latent_dim, lstm_hidden)
        self.bn_lstm = DepthBatchNorm(lstm_hidden, depths)
        self.fc_value_prefix = MLP([lstm_hidden, hidden, support_bins], depths, last_zero_init=True)

    def forward(self, state, action, lstm_state, depth):
        actions = torch.arange(self.num_actions, device=action.device)
        a = (action.long()[:, None] == actions).to(state.dtype)        # [B, A] one-hot (F.one_hot checks on the host)
        x = F.relu(self.bn(self.fc(torch.cat([state, a], dim=1)), depth) + state)
        next_state = F.relu(x + self.res(x, depth))                   # [B, D]
        h, c = self.lstm(next_state, lstm_state)
        return next_state, self.fc_value_prefix(F.relu(self.bn_lstm(h, depth)), depth), (h, c)


class MLPPrediction(nn.Module):
    def __init__(self, latent_dim, num_actions, hidden, support_bins, depths):
        super().__init__()
        self.fc_policy = MLP([latent_dim, hidden, num_actions], depths, last_zero_init=True)
        self.fc_value = MLP([latent_dim, hidden, support_bins], depths, last_zero_init=True)

    def forward(self, state, depth):
        return self.fc_policy(state, depth), self.fc_value(state, depth)  # [B, A], [B, S]


class MLPNet(_Inference):
    def __init__(self, obs_shape, num_actions, hidden=128, latent_dim=64, lstm_hidden=64, support_size=300,
                 proj_hid=128, proj_out=128, pred_hid=64, pred_out=128, state_norm=False, bn_depths=6,
                 obs_norm=False):
        super().__init__()
        bins = 2 * support_size + 1
        self.num_actions, self.support_size, self.lstm_hidden = num_actions, support_size, lstm_hidden
        self.latent_shape, self.state_norm = (latent_dim,), state_norm
        self.representation = MLP([obs_shape[0], hidden, latent_dim], first_bn=obs_norm)
        self.dynamics = MLPDynamics(latent_dim, num_actions, hidden, lstm_hidden, bins, bn_depths)
        self.prediction = MLPPrediction(latent_dim, num_actions, hidden, bins, bn_depths)
        self.projection = MLP([latent_dim, proj_hid, proj_hid, proj_out], last_bn=True)
        self.projection_head = MLP([proj_out, pred_hid, pred_out])


def make_model(obs_shape, num_actions, **kwargs):
    """The conv net for image observations [C, H, W], the MLP for vector observations [D]."""
    if len(obs_shape) == 3:
        return EfficientZeroNet(tuple(obs_shape), num_actions, **kwargs)
    if len(obs_shape) == 1:
        return MLPNet(tuple(obs_shape), num_actions, **kwargs)
    raise ValueError(f"obs_shape must be [C, H, W] (images) or [D] (vectors), got {tuple(obs_shape)}")
