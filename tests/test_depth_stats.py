"""Inference sees what training saw: eval-mode predictions match train-mode ones at every unroll depth.

The learner unrolls K steps in train mode, so every BatchNorm normalizes depth k with depth k's batch
statistics; inference (self-play, reanalysis, evaluation, search nodes) runs in eval mode on running
statistics. With one set of running statistics for all depths (--bn-stats shared, the original's design) the
deeper steps are normalized with an average over depths and their predictions drift; with one set per depth
(--bn-stats depth, the default) they do not. Measured here on a trained MLP (synthetic sequences with a known
value prefix) and, at the level of shapes, on the Atari network.
"""
import copy

import pytest
import torch

import train
from config import Config
from model import make_model
from reanalyze import Targets

K = 5


def unroll_value_prefix(model, obs0, actions):
    """Predicted value prefix [K, B] along the unroll from obs0 [B, D] with actions [B, K]."""
    out = model.initial_inference(obs0)
    latent, lstm, prefixes = out.latent, out.lstm_state, []
    for k in range(1, K + 1):
        step = model.recurrent_inference(latent, lstm, actions[:, k - 1], k)
        latent, lstm = step.latent, step.lstm_state
        prefixes.append(step.value_prefix)
    return torch.stack(prefixes)


def eval_train_gap(model, obs0, actions):
    """|mean eval-mode prefix - mean train-mode prefix| per depth 1..K on the same batch [K]; the model is
    copied, so the train-mode pass does not move its statistics."""
    with torch.no_grad():
        ev = unroll_value_prefix(copy.deepcopy(model).eval(), obs0, actions).mean(1)
        tr = unroll_value_prefix(copy.deepcopy(model).train(), obs0, actions).mean(1)
    return (ev - tr).abs(), ev, tr


def batches(B=64, D=4, A=2, seed=0):
    """Synthetic learner batches: random observations and actions, the value prefix k after k steps (reward 1
    per step, as CartPole), zero values, uniform policies."""
    g = torch.Generator().manual_seed(seed)
    prefix = torch.arange(1, K + 1, dtype=torch.float32).expand(B, K)                  # [B, K]: 1, 2, ..., K
    targets = Targets(torch.zeros(B, K + 1), prefix, torch.full((B, K + 1, A), 1 / A), torch.full((B,), 5))
    while True:
        yield torch.randn(B, K + 1, D, generator=g), torch.randint(0, A, (B, K), generator=g), targets


def recalibrate(model, data, passes=60):
    """Refresh the BatchNorm running statistics of the weights as they are: train-mode unroll passes, no
    gradient, no weight change (momentum 0.1: after 60 passes the old statistics weigh 0.9^60 = 0.2%)."""
    model.train()
    with torch.no_grad():
        for _ in range(passes):
            obs, actions, _ = next(data)
            unroll_value_prefix(model, obs[:, 0], actions)
    return model


@pytest.fixture(scope="module")
def trained():
    """One MLP trained for 200 updates with the learner's own unroll loss (consistency off), and the same
    weights with one shared set of statistics; both sets refreshed on the same batches."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)                                                           # tiny ops: one thread
    torch.manual_seed(0)
    kwargs = dict(hidden=32, latent_dim=16, lstm_hidden=16, support_size=10, proj_hid=16, proj_out=16,
                  pred_hid=8, pred_out=16)
    model = make_model((4,), 2, bn_depths=K + 1, **kwargs).train()
    cfg = Config(num_unroll_steps=K, consistency=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    data = batches()
    for _ in range(200):
        obs, actions, targets = next(data)
        losses, _ = train.unroll_losses(model, obs, actions, torch.ones(actions.shape), targets, cfg)
        opt.zero_grad()
        losses.mean(1).sum().backward()
        opt.step()
    shared = make_model((4,), 2, bn_depths=1, **kwargs)
    shared.load_state_dict({k: v for k, v in model.state_dict().items() if "running" not in k}, strict=False)
    for m in (model, shared):
        recalibrate(m, batches(seed=2))
    g = torch.Generator().manual_seed(1)
    probe = torch.randn(256, 4, generator=g), torch.randint(0, 2, (256, K), generator=g)
    yield model, shared, probe
    torch.set_num_threads(threads)


def test_per_depth_statistics_keep_eval_mode_on_train_mode_at_every_depth(trained):
    # Tolerance 0.25: the prefix targets are 1..5, one apart, so a gap under a quarter keeps every depth's
    # prediction closest to its own target; what remains is the difference between one batch's statistics
    # and the running average of many (momentum 0.1).
    model, _, probe = trained
    gap, ev, tr = eval_train_gap(model, *probe)
    torch.testing.assert_close(tr, torch.arange(1.0, K + 1), atol=0.35, rtol=0)       # it learned the prefix
    assert gap.max() < 0.25, (gap, ev, tr)


def test_one_shared_set_of_statistics_drifts_with_depth(trained):
    # The same weights with the original's one set of statistics: the gap the bound above exists to catch.
    model, shared, probe = trained
    gap, ev, tr = eval_train_gap(shared, *probe)
    torch.testing.assert_close(tr, eval_train_gap(model, *probe)[2])                   # same train-mode output
    assert gap.max() > 0.5, (gap, ev, tr)


def test_atari_network_per_depth_statistics_after_updates_on_random_frames():
    """Shape-level probe of the conv net: a few learner updates on random frames move every depth's own
    statistics of dynamics and prediction, inference at depth d reads set min(d, K), and the probe runs."""
    torch.manual_seed(0)
    model = make_model((12, 96, 96), 4, channels=8, reduced_channels=2, fc_hidden=8, lstm_hidden=8, support_size=5,
                       proj_hid=8, proj_out=8, pred_hid=8, pred_out=8, bn_depths=K + 1).train()
    cfg = Config(num_unroll_steps=K, augmentation=False)
    B = 6
    for _ in range(2):
        obs = torch.randint(0, 256, (B, K + 1, 12, 96, 96), dtype=torch.uint8)
        targets = Targets(torch.rand(B, K + 1), torch.rand(B, K), torch.full((B, K + 1, 4), 0.25), torch.full((B,), 5))
        losses, _ = train.unroll_losses(model, obs, torch.randint(0, 4, (B, K)), torch.ones(B, K), targets, cfg)
        losses.sum().backward()
    stats = model.dynamics.bn.running_mean                                            # [K + 1, C]
    assert stats.shape == (K + 1, 8)
    assert torch.equal(stats[0], torch.zeros(8))                                      # depth 0: no dynamics step
    assert all((stats[d] != 0).any() for d in range(1, K + 1))                        # each depth its own set
    assert not torch.equal(stats[1], stats[K])
    assert (model.prediction.bn_value.running_mean != 0).any(1).all()                 # prediction: depths 0..K
    obs0 = torch.randint(0, 256, (B, 12, 96, 96), dtype=torch.uint8)
    gap, ev, tr = eval_train_gap(model, obs0, torch.randint(0, 4, (B, K)))
    assert gap.shape == ev.shape == tr.shape == (K,) and torch.isfinite(gap).all()
    model.eval()
    with torch.no_grad():                                                             # a search step: mixed depths
        root = model.initial_inference(obs0)
        depth = torch.tensor([1, 2, 3, 5, 9, 1])
        mixed = model.recurrent_inference(root.latent, root.lstm_state, torch.zeros(B, dtype=torch.long), depth)
        for b, d in enumerate(depth.tolist()):
            one = model.recurrent_inference(root.latent[b:b + 1], tuple(s[b:b + 1] for s in root.lstm_state),
                                            torch.zeros(1, dtype=torch.long), min(d, K))
            torch.testing.assert_close(mixed.value_prefix_logits[b:b + 1], one.value_prefix_logits,
                                       atol=1e-4, rtol=1e-4)
