"""Reanalysis targets against hand-computed numbers (EZ_SPEC §5) and against a real tiny model + search."""

import numpy as np
import pytest
import torch

from config import Config
from mcts import search
from model import make_model
from reanalyze import reanalyze, td_horizon, value_prefix_targets, value_targets
from replay import ReplayBuffer


# ---------------------------------------------------------------------------------------------
# Pure functions, hand-computed
# ---------------------------------------------------------------------------------------------

def test_td_horizon_with_and_without_off_policy_correction():
    ages = torch.tensor([0, 29_999, 30_000, 95_000, 100_000, 200_000])
    # on: 5 - floor(age / 30k) = 5 - [0, 0, 1, 3, 3, 6] -> clip to [1, 5]
    assert td_horizon(ages, 100_000).tolist() == [5, 5, 4, 2, 2, 1]
    # off: the fixed horizon td_steps at every age (the ablation of issue #4)
    assert td_horizon(ages, 100_000, off_policy_correction=False).tolist() == [5, 5, 5, 5, 5, 5]
    assert td_horizon(np.array([0, 100]), 100, td_steps=3).tolist() == [3, 1]   # 3 - floor(100 / 30) = 0 -> 1
    assert td_horizon(ages, 100_000).dtype == torch.int64


def test_value_targets_by_hand():
    g = 0.5
    rewards = torch.tensor([[1.0, 0.0, -1.0, 1.0, 1.0],
                            [1.0, 1.0, 9.0, 9.0, 9.0],      # episode of 2 steps: the 9s lie past the end
                            [1.0, -1.0, 1.0, 1.0, 0.0]])
    bootstrap = torch.tensor([[2.0, 4.0, 8.0], [5.0, 7.0, 9.0], [3.0, 5.0, 7.0]])   # V(o_{j+l}), j = 0..2
    horizon = torch.tensor([3, 2, 2])
    episode_left = torch.tensor([6, 2, 4])                  # 6 = W + 1: still running
    z = value_targets(rewards, bootstrap, horizon, episode_left, g, K=2)
    expected = torch.tensor([
        # l = 3, every bootstrap (j + 3 < 6) inside the episode
        [1 + g * 0 + g**2 * -1 + g**3 * 2,                  # 1 - 0.25 + 0.25 = 1.0
         0 + g * -1 + g**2 * 1 + g**3 * 4,                  # -0.5 + 0.25 + 0.5 = 0.25
         -1 + g * 1 + g**2 * 1 + g**3 * 8],                 # -1 + 0.5 + 0.25 + 1 = 0.75
        # l = 2, episode_left 2: no bootstrap (j + 2 >= 2), rewards past the end are 0, z_2 = 0 (j >= 2)
        [1 + g * 1, 1 + g * 0, 0.0],                        # 1.5, 1.0, 0
        # l = 2, episode_left 4: bootstraps at j = 0, 1 (2 < 4, 3 < 4), none at j = 2 (4 >= 4)
        [1 + g * -1 + g**2 * 3,                             # 0.5 + 0.75 = 1.25
         -1 + g * 1 + g**2 * 5,                             # -0.5 + 1.25 = 0.75
         1 + g * 1]])                                       # 1.5
    torch.testing.assert_close(z, expected)
    assert expected.tolist() == [[1.0, 0.25, 0.75], [1.5, 1.0, 0.0], [1.25, 0.75, 1.5]]


def test_value_targets_paper_discount_five_steps():
    g = 0.997 ** 4
    rewards = torch.tensor([[1.0, 1.0, 0.0, 1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0]])
    z = value_targets(rewards, torch.full((1, 6), 10.0), torch.tensor([5]), torch.tensor([11]), g, K=5)
    # z_0 = 1 + g + g^3 + 10 g^5;  z_5 = r_5 + g r_6 + g^4 r_9 + 10 g^5
    assert abs(z[0, 0].item() - (1 + g + g**3 + 10 * g**5)) < 1e-5
    assert abs(z[0, 5].item() - (1 + g + g**4 + 10 * g**5)) < 1e-5


def test_value_prefix_targets_reset_every_horizon():
    rewards = torch.tensor([[1.0, 0.0, -1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]])
    full = torch.tensor([11])
    # zeta = 5: running sums 1, 1+0, 1+0-1, 0+1, 1+1
    assert value_prefix_targets(rewards, full, 5, 5).tolist() == [[1, 1, 0, 1, 2]]
    # zeta = 2: resets at m = 2, 4: r0, r0+r1, r2, r2+r3, r4
    assert value_prefix_targets(rewards, full, 5, 2).tolist() == [[1, 1, -1, 0, 1]]
    # zeta = 3: reset at m = 3: r0, r0+r1, r0+r1+r2, r3, r3+r4
    assert value_prefix_targets(rewards, full, 5, 3).tolist() == [[1, 1, 0, 1, 2]]
    # the episode ends after 3 steps: the sum is carried (zeta = 5), or restarts at 0 (zeta = 2)
    assert value_prefix_targets(rewards, torch.tensor([3]), 5, 5).tolist() == [[1, 1, 0, 0, 0]]
    assert value_prefix_targets(rewards, torch.tensor([3]), 5, 2).tolist() == [[1, 1, -1, -1, 0]]


# ---------------------------------------------------------------------------------------------
# reanalyze with the real tiny MLP model and the real search
# ---------------------------------------------------------------------------------------------

E, A, D = 3, 2, 4


def config(**overrides):
    """A full Config (fields reanalyze reads and these tests do not name keep their defaults)."""
    cfg = dict(num_unroll_steps=5, td_steps=5, discount=0.9, training_steps=100, off_policy_correction=True,
               reanalyze_ratio=0.5, reanalyze_noise=True, use_root_value=False, num_simulations=4, lstm_horizon_len=5,
               pb_c_base=19652, pb_c_init=1.25, root_dirichlet_alpha=0.3,
               root_exploration_fraction=0.25, value_delta_max=0.01, search_backend="torch")
    cfg.update(overrides)
    return Config(**cfg)


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = make_model((D,), A, hidden=16, latent_dim=8, lstm_hidden=8, support_size=10, proj_hid=8, proj_out=8,
                       pred_hid=8, pred_out=8)
    with torch.no_grad():  # the zero-initialised heads would give V = 0 everywhere: randomise every weight
        for p in model.parameters():
            p.normal_(0, 0.5)
    model.eval()
    rng = np.random.default_rng(0)
    buf = ReplayBuffer(1000, E, (D,), 1, A, frame_dtype=np.float32)
    lengths = [7, 13, 30]
    dones, rewards = [], []                                               # per global index, as added
    for step in range(40):
        done = np.array([(step + 1) % n == 0 for n in lengths])
        visits = rng.dirichlet(np.ones(A), size=E).astype(np.float32)
        reward = rng.normal(size=E) * 3
        buf.add(rng.random((E, D), dtype=np.float32), rng.integers(A, size=E), reward, done,
                rng.normal(size=E), visits, rng.random((E, D), dtype=np.float32))
        dones += done.tolist()
        rewards += reward.tolist()
    batch = buf.sample(16, 5, 5, 0.4, torch.Generator().manual_seed(1))
    return model, buf, batch, dones, rewards


def hand_value_targets(buf, batch, dones, rewards, cfg, bootstrap_fn):
    """z_j of EZ_SPEC §5.2 by walking each sample's env stream as it was added, one position at a time."""
    K, g = cfg.num_unroll_steps, cfg.discount
    out = np.zeros((len(batch.indices), K + 1))
    for b, t in enumerate(batch.indices.tolist()):
        l = max(1, min(5, 5 - (len(buf) - t) // 30))                            # age / (0.3 * 100)
        left = 0                                                                # steps until the episode ends
        while True:
            left += 1
            if dones[t + (left - 1) * E] or left == 11:
                break
        for j in range(K + 1):
            if j >= left:
                continue
            z = sum(g**i * np.sign(rewards[t + (j + i) * E]) for i in range(l) if j + i < left)
            if j + l < left:
                z += g**l * bootstrap_fn(t, j + l)
            out[b, j] = z
    return out


def test_reanalyze_targets_with_a_real_model(setup):
    model, buf, batch, dones, rewards = setup
    cfg = config()
    targets = reanalyze(batch, buf, model, cfg, torch.Generator().manual_seed(0))
    B, K = 16, 5
    assert targets.value.shape == (B, K + 1) and targets.value_prefix.shape == (B, K)
    assert targets.policy.shape == (B, K + 1, A) and targets.horizon.shape == (B,)
    assert sorted(set(targets.horizon.tolist())) == [2, 3, 4, 5]                # ages 0..120: l = 5 - age // 30
    # policy: reanalyzed (first 8) rows are visit distributions before the end, zero from it on
    alive = torch.arange(K + 1)[None] < batch.episode_left[:, None]      # [B, K+1]
    assert (~alive).any() and alive[:8].any()
    pi = targets.policy[:8]
    torch.testing.assert_close(pi.sum(-1)[alive[:8]], torch.ones(int(alive[:8].sum())))
    assert (pi[~alive[:8]] == 0).all()
    assert torch.allclose(pi * cfg.num_simulations, (pi * cfg.num_simulations).round(), atol=1e-5)
    assert not torch.allclose(pi, batch.child_visits[:8])
    # the rest: the stored self-play distributions
    torch.testing.assert_close(targets.policy[8:], batch.child_visits[8:])

    def network_value(t, offset):
        obs = buf.stacks(np.array([t]), np.array([offset]))
        return model.initial_inference(obs).value.item()

    expected = hand_value_targets(buf, batch, dones, rewards, cfg, network_value)
    assert np.abs(expected).max() > 1.0                                         # not a trivial all-zero case
    np.testing.assert_allclose(targets.value.numpy(), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(targets.value_prefix.numpy(),
                               value_prefix_targets(batch.rewards, batch.episode_left, K, 5).numpy())


def test_reanalyze_bootstraps_from_the_root_value_when_asked(setup):
    model, buf, batch, dones, rewards = setup
    cfg = config(use_root_value=True, reanalyze_ratio=0.0)
    targets = reanalyze(batch, buf, model, cfg, torch.Generator().manual_seed(3))
    # the same search, replayed with the same generator state: roots o_{t+j+l} in (sample, j) order
    K = 5
    horizon = td_horizon(batch.ages, 100)
    offsets = (np.arange(K + 1)[None] + horizon.numpy()[:, None]).reshape(-1)
    roots = model.initial_inference(buf.stacks(np.repeat(batch.indices.numpy(), K + 1), offsets))
    root_values = search(model, roots, 4, add_noise=True, generator=torch.Generator().manual_seed(3), gamma=0.9,
                         backend="torch").root_values.view(-1, K + 1)
    position = {(t, j): b for b, t in enumerate(batch.indices.tolist()) for j in range(K + 1)}

    def root_value(t, offset):
        b = position[(t, 0)]
        return root_values[b, offset - horizon[b].item()].item()

    np.testing.assert_allclose(targets.value.numpy(), hand_value_targets(buf, batch, dones, rewards, cfg, root_value),
                               rtol=1e-5, atol=1e-5)
    plain = reanalyze(batch, buf, model, config(reanalyze_ratio=0.0), torch.Generator())
    assert not torch.allclose(plain.value, targets.value)
    torch.testing.assert_close(targets.policy, batch.child_visits)       # ratio 0: all stored
