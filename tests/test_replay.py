"""Replay buffer against EZ_SPEC §1 (stacks), §4.2 (batch layout), §4.4 (PER), the lockstep contract, and
truncated episodes (time limits, resumed runs)."""

import numpy as np
import pytest
import torch

from reanalyze import value_targets
from replay import ReplayBuffer


class FakeEnvs:
    """E envs in lockstep; env e plays episodes of the lengths lengths[e] (cycled).

    Frame of env e at step k of its n-th episode: [e, n, k]; the final observation (after the last
    action) is [e, n, L]. Observations are stacks of S frames that repeat the first frame at the start,
    as atari.py makes them. action = (k + e) % A, raw reward = ((k % 3) - 1) * 2.5, root value = 10 e + k.
    step(buf, cut=[e, ...]) cuts those envs' episodes after this step, as a time limit does (truncated).
    """

    def __init__(self, lengths, stack=2, num_actions=3):
        self.lengths, self.S, self.A = lengths, stack, num_actions
        self.E = len(lengths)
        self.n = [0] * self.E      # episode number per env
        self.k = [0] * self.E      # step in the episode per env
        self.ref = []              # per global index: (e, n, k, L)
        self.status = {}           # (e, n) -> "running", "terminal" or "truncated"

    def L(self, e, n):
        return self.lengths[e][n % len(self.lengths[e])]

    def obs(self, e, n, k):
        frames = [[e, n, max(k - self.S + 1 + s, 0)] for s in range(self.S)]
        return np.array(frames, np.float32).reshape(-1)                  # [S * 3] frame-major

    def visit_dist(self, e, k):
        d = np.zeros(self.A, np.float32)
        d[(k + e) % self.A] = 0.75
        d[(k + e + 1) % self.A] += 0.25
        return d

    def step(self, buf, cut=()):
        obs, act, rew, done, truncated, rv, vis, fin = [], [], [], [], [], [], [], []
        for e in range(self.E):
            n, k, L = self.n[e], self.k[e], self.L(e, self.n[e])
            self.ref.append((e, n, k, L))
            obs.append(self.obs(e, n, k))
            act.append((k + e) % self.A)
            rew.append(((k % 3) - 1) * 2.5)
            terminal, truncate = k == L - 1, e in cut and k < L - 1
            done.append(terminal or truncate)
            truncated.append(truncate)
            rv.append(10 * e + k)
            vis.append(self.visit_dist(e, k))
            fin.append(self.obs(e, n, L))                                 # final stack ends with [e, n, L]
            self.status[(e, n)] = "terminal" if terminal else "truncated" if truncate else "running"
            self.n[e], self.k[e] = (n + 1, 0) if terminal or truncate else (n, k + 1)
        buf.add(np.stack(obs), np.array(act), np.array(rew, np.float32), np.array(done), np.array(rv, np.float32),
                np.stack(vis), np.stack(fin), np.array(truncated))

    def ended(self, e, n):
        return self.status.get((e, n)) == "terminal"


def make(lengths, steps, stack=2, num_actions=3, capacity=1000):
    env = FakeEnvs(lengths, stack, num_actions)
    buf = ReplayBuffer(capacity, len(lengths), (3,), stack, num_actions, frame_dtype=np.float32)
    for _ in range(steps):
        env.step(buf)
    return env, buf


def gen(seed):
    return torch.Generator().manual_seed(seed)


def expected_stack(env, e, n, step, L, ended):
    """Frames step-S+1..step of the episode: first frame repeated before it, final obs after it."""
    out = []
    for s in range(env.S):
        q = max(step - env.S + 1 + s, 0)
        if ended:
            q = min(q, L)                                                 # q == L is the final observation
        out.append([e, n, q])
    return np.array(out, np.float32).reshape(-1)


def sampleable(buf, window):
    return torch.nonzero(buf._sampleable(window)).flatten().tolist()


# ---------------------------------------------------------------------------------------------
# Batch assembly (EZ_SPEC §4.2) on lockstep data with episodes ending at different times
# ---------------------------------------------------------------------------------------------

def test_every_sampleable_transition_assembles_its_batch_correctly():
    K, td = 3, 2
    W = K + td
    env, buf = make([[4, 7], [9], [2, 3, 1]], steps=14, stack=2, num_actions=3)
    assert len(buf) == 14 * 3
    B = buf.num_sampleable(K, td)
    batch = buf.sample(B, K, td, 0.4, gen(0))                             # every sampleable one, once
    assert batch.indices.device == buf.device and batch.obs.device == buf.device
    assert sorted(batch.indices.tolist()) == sorted(set(batch.indices.tolist()))
    for b, t in enumerate(batch.indices.tolist()):
        e, n, k, L = env.ref[t]
        ended = env.ended(e, n)
        left = min(L - k, W + 1) if ended else W + 1
        assert batch.episode_left[b] == left
        assert batch.ages[b] == len(buf) - t
        for m in range(K + 1):
            np.testing.assert_array_equal(batch.obs[b, m].numpy(), expected_stack(env, e, n, k + m, L, ended))
            if k + m < L:
                assert batch.root_values[b, m] == 10 * e + k + m
                np.testing.assert_array_equal(batch.child_visits[b, m].numpy(), env.visit_dist(e, k + m))
            else:                                                         # past the end: zeros
                assert batch.root_values[b, m] == 0 and not batch.child_visits[b, m].any()
        for m in range(K):
            exists = k + m < L
            assert batch.mask[b, m] == float(exists)
            if exists:
                assert batch.actions[b, m] == (k + m + e) % 3
            assert 0 <= batch.actions[b, m] < 3
        for m in range(W):
            expected = np.sign(((k + m) % 3) - 1) if k + m < L else 0.0
            assert batch.rewards[b, m] == expected


def test_random_actions_past_the_end_are_uniform():
    env, buf = make([[2]], steps=40, stack=1, num_actions=4)   # every episode has 2 transitions
    g = gen(1)
    past = []
    for _ in range(200):
        batch = buf.sample(8, 5, 5, 1.0, g)
        past.append(batch.actions[batch.mask == 0])
    counts = np.bincount(torch.cat(past).numpy(), minlength=4)
    assert counts.sum() > 4000
    assert np.all(np.abs(counts / counts.sum() - 0.25) < 0.03), counts


def test_stack_at_episode_start_repeats_the_first_frame_and_final_obs_ends_it():
    # Atari-like uint8 frames [3, 2, 2], stack 4 -> obs [12, 2, 2]; one env, episode of 3 steps then a new one.
    frames = [np.full((3, 2, 2), 10 * i, np.uint8) for i in range(7)]    # f0 f1 f2 | final f3 | f4 f5 f6
    buf = ReplayBuffer(100, 1, (3, 2, 2), 4, 2)

    def stack(*ids):
        return np.concatenate([frames[i] for i in ids])                   # [12, 2, 2] frame-major

    seq = [(stack(0, 0, 0, 0), False), (stack(0, 0, 0, 1), False), (stack(0, 0, 1, 2), True),
           (stack(4, 4, 4, 4), False), (stack(4, 4, 4, 5), False), (stack(4, 4, 5, 6), False)]
    for obs, done in seq:
        buf.add(obs[None], np.array([1]), np.array([1.0]), np.array([done]), np.zeros(1), np.full((1, 2), 0.5),
                stack(0, 1, 2, 3)[None] if done else None)
    assert buf.frames.dtype == torch.uint8
    # the stored stacks rebuild exactly the observations that were added
    np.testing.assert_array_equal(buf.stacks(np.arange(6), np.zeros(6, int)).numpy(), np.stack([o for o, _ in seq]))
    # from t = 0: offset 3 is the final observation, beyond it the final frame repeats
    np.testing.assert_array_equal(buf.stacks(np.zeros(3, int), np.array([3, 4, 6])).numpy(),
                                  np.stack([stack(0, 1, 2, 3), stack(1, 2, 3, 3), stack(3, 3, 3, 3)]))
    # frames before the second episode's start repeat its first frame, not the previous episode's frames
    np.testing.assert_array_equal(buf.stacks(np.array([3]), np.array([0])).numpy(), stack(4, 4, 4, 4)[None])


def test_final_obs_in_lockstep_goes_to_the_right_episode():
    env, buf = make([[3], [5], [2]], steps=10, stack=2)
    for t, (e, n, k, L) in enumerate(env.ref):
        if env.ended(e, n):
            got = buf.stacks(np.array([t]), np.array([L - k]))[0].numpy()  # the step after the last action
            np.testing.assert_array_equal(got, expected_stack(env, e, n, L, L, True))
            assert got[-3:].tolist() == [e, n, L]


# ---------------------------------------------------------------------------------------------
# Sampleable rule
# ---------------------------------------------------------------------------------------------

def test_sampleable_rule():
    # E = 2; env 0: episode of 4 steps (indices 0 2 4 6) then a running one (8 10 12 14);
    # env 1 runs (1 3 ... 15). W = 5: a running transition t needs t + 5 * 2 < 16, i.e. t < 6.
    env, buf = make([[4, 100], [100]], steps=8)
    assert sampleable(buf, 5) == [0, 1, 2, 3, 4, 5, 6]
    assert buf.num_sampleable(3, 2) == 7
    assert buf.num_sampleable() == 4                                      # W = 10: t < -4, only the ended episode
    for _ in range(20):
        batch = buf.sample(7, 3, 2, 0.4, gen(_))
        assert sorted(batch.indices.tolist()) == [0, 1, 2, 3, 4, 5, 6]


# ---------------------------------------------------------------------------------------------
# Prioritized sampling (EZ_SPEC §4.4)
# ---------------------------------------------------------------------------------------------

def filled_with_priorities(p):
    env, buf = make([[len(p)]], steps=len(p), stack=1)                    # one ended episode: all sampleable
    buf.update_priorities(torch.arange(len(p)), torch.tensor(p))
    return buf


def test_sampling_frequencies_follow_priorities():
    p = np.array([0.1, 0.5, 1.0, 2.0, 4.0, 0.3, 3.0, 1.5, 0.05, 2.5])
    buf = filled_with_priorities(p)
    g = gen(123)
    draws = 3000
    counts = np.bincount([buf.sample(1, 5, 5, 0.4, g).indices[0].item() for _ in range(draws)], minlength=len(p))
    expected = draws * p ** 0.6 / (p ** 0.6).sum()                       # P(i) = p_i^alpha / sum_k p_k^alpha
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert chi2 < 27.88, (counts, expected)                               # chi-square, 9 dof, p = 0.001
    # and it is not uniform: the top priority is drawn more than 4 times as often as the lowest
    assert counts[4] > 4 * counts[8]


def test_draws_without_replacement_follow_sequential_sampling():
    # P(first = i, second = j) of sampling without replacement: P(i) P(j) / (1 - P(i)), as np.random.choice
    p = np.array([4.0, 1.0, 0.2])
    buf = filled_with_priorities(p)
    w = p ** 0.6 / (p ** 0.6).sum()
    g = gen(5)
    draws = 3000
    sets = [tuple(sorted(buf.sample(2, 5, 5, 0.4, g).indices.tolist())) for _ in range(draws)]
    for pair in [(0, 1), (0, 2), (1, 2)]:
        i, j = pair
        expected = w[i] * w[j] / (1 - w[i]) + w[j] * w[i] / (1 - w[j])
        assert abs(sets.count(pair) / draws - expected) < 0.035, (pair, sets.count(pair) / draws, expected)


def test_replay_window_draws_only_the_newest_transitions():
    # --replay-window w: the batch comes from the newest w transitions, with probabilities and importance weights
    # over those alone (as if the older ones were not stored); 0 keeps every transition, as the original
    p = np.array([0.1, 0.5, 1.0, 2.0, 4.0, 0.3, 3.0, 1.5, 0.05, 2.5])
    buf = filled_with_priorities(p)
    seen = set()
    for i in range(200):
        batch = buf.sample(3, 5, 5, 0.4, gen(i), window=4)
        seen |= set(batch.indices.tolist())
    assert seen == {6, 7, 8, 9}
    batch = buf.sample(4, 5, 5, 1.0, gen(0), window=4)                    # all four: weights from their P(i) alone
    P = p[6:] ** 0.6 / (p[6:] ** 0.6).sum()
    w = (4 * P[batch.indices.numpy() - 6]) ** -1.0
    np.testing.assert_allclose(batch.weights.numpy(), w / w.max(), rtol=1e-5)
    assert set(buf.sample(10, 5, 5, 0.4, gen(1), window=0).indices.tolist()) == set(range(10))
    # it counts transitions that can be sampled: the newest ones of running episodes, still waiting for their
    # successors, are not in it (sampleable here: 0..6, see test_sampleable_rule)
    env, buf = make([[4, 100], [100]], steps=8)
    for i in range(20):
        assert sorted(buf.sample(3, 3, 2, 0.4, gen(i), window=3).indices.tolist()) == [4, 5, 6]


def test_importance_weights_match_the_formula_and_no_index_repeats():
    p = np.array([0.1, 0.5, 1.0, 2.0, 4.0, 0.3, 3.0, 1.5, 0.05, 2.5])
    buf = filled_with_priorities(p)
    beta = 0.4
    batch = buf.sample(6, 5, 5, beta, gen(7))
    assert len(set(batch.indices.tolist())) == 6                          # without replacement
    P = p ** 0.6 / (p ** 0.6).sum()
    w = (len(p) * P[batch.indices.numpy()]) ** (-beta)
    np.testing.assert_allclose(batch.weights.numpy(), w / w.max(), rtol=1e-5)
    assert batch.weights.dtype == torch.float32 and batch.weights.max() == 1.0


def test_new_data_gets_the_current_max_priority():
    env, buf = make([[50]], steps=3, stack=1)
    assert buf.priorities[:3].tolist() == [1.0, 1.0, 1.0]                 # the first data: 1
    buf.update_priorities(torch.tensor([0, 1, 2]), torch.tensor([0.2, 7.0, 0.5]))
    env.step(buf)
    assert buf.priorities[3] == 7.0
    buf.update_priorities(torch.tensor([1, 3]), torch.tensor([0.1, 0.3]))  # the max can go down too
    env.step(buf)
    assert buf.priorities[4] == 0.5
    assert buf.priorities[:5].tolist() == pytest.approx([0.2, 0.1, 0.5, 0.3, 0.5])


# ---------------------------------------------------------------------------------------------
# Truncated episodes: a time limit, or a resumed run (EZ_SPEC §5.2 quirk c is the original's terminal)
# ---------------------------------------------------------------------------------------------

def test_a_time_limit_truncates_the_episode_it_never_becomes_terminal():
    # E = 2, W = 3: env 0 is cut after its 6th step (indices 0 2 .. 10), env 1 runs on.
    env = FakeEnvs([[100], [100]], stack=2)
    buf = ReplayBuffer(1000, 2, (3,), 2, 3, frame_dtype=np.float32)
    for step in range(10):
        env.step(buf, cut=[0] if step == 5 else ())
    assert env.status[(0, 0)] == "truncated" and env.status[(0, 1)] == "running"
    assert buf.ep_end[0:12:2].tolist() == [10] * 6 and not buf.ep_terminal[:12].any()
    assert buf.num_final == 0                                             # no final observation is kept
    # the cut episode is sampled only where W steps of it follow t: 0 2 4 (t + 3 * 2 <= 10), never 6 8 10
    assert [t for t in sampleable(buf, 3) if t % 2 == 0] == [0, 2, 4, 12]
    batch = buf.batch(torch.tensor([0, 2, 4]), torch.ones(3), 2, 1, gen(0))
    assert batch.episode_left.tolist() == [4, 4, 4] and batch.mask.all()  # not an end: capped, like a running one
    # its stacks never read past the cut: the last stored frame repeats
    np.testing.assert_array_equal(buf.stacks(np.array([10]), np.array([2]))[0].numpy(), [0, 0, 5, 0, 0, 5])


def test_resume_cuts_running_episodes_and_keeps_the_targets_before_the_cut():
    """A run stopped mid-episode and resumed (its envs restart) gives every sampleable position before the cut
    the same value targets and masks as the uninterrupted run; the cut episodes are truncated, never terminal."""
    K, td, E = 3, 2, 2
    W = K + td
    lengths = [[7, 50], [40]]
    whole, first = FakeEnvs(lengths, stack=2), FakeEnvs(lengths, stack=2)
    full, stopped = (ReplayBuffer(1000, E, (3,), 2, 3, frame_dtype=np.float32) for _ in range(2))
    for step in range(30):
        whole.step(full)
        if step < 12:                                                     # the run stops after 12 lockstep steps
            first.step(stopped)
    cut_at = 12 * E
    resumed = ReplayBuffer(1000, E, (3,), 2, 3, frame_dtype=np.float32)
    resumed.load_state_dict(stopped.state_dict())                         # as train.restore
    resumed.truncate_running_episodes()
    assert not resumed.ep_terminal[14:cut_at:2].any() and not resumed.ep_terminal[1:cut_at:2].any()
    assert resumed.ep_end[1:cut_at:2].tolist() == [cut_at - 1] * 12
    restarted = FakeEnvs([[3], [4]], stack=2)
    restarted.n = [99, 99]                                                # new episodes after the restart
    for _ in range(8):
        restarted.step(resumed)
    before = [t for t in sampleable(resumed, W) if t < cut_at]
    assert before and set(before) <= set(sampleable(full, W))
    assert max(before) < cut_at - W * E + E                               # nothing within W steps of the cut
    t = torch.tensor(before)
    a = full.batch(t, torch.ones(len(t)), K, td, gen(0))
    b = resumed.batch(t, torch.ones(len(t)), K, td, gen(0))
    for field in ("mask", "rewards", "episode_left", "obs", "child_visits", "root_values"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field
    # value targets from the same bootstrap values (any function of the stacks): identical
    horizon = torch.full((len(t),), td)

    def targets(buf, batch):
        offsets = torch.arange(K + 1)[None] + horizon[:, None]
        boot = buf.stacks(t[:, None].expand(-1, K + 1).reshape(-1), offsets.reshape(-1)).sum(-1).view(-1, K + 1)
        return value_targets(batch.rewards, boot, horizon, batch.episode_left, 0.9, K)

    torch.testing.assert_close(targets(full, a), targets(resumed, b))


# ---------------------------------------------------------------------------------------------
# Checkpointing and capacity
# ---------------------------------------------------------------------------------------------

def test_state_dict_round_trip():
    env, buf = make([[4, 7], [9], [2, 3, 1]], steps=12)
    buf.update_priorities(torch.arange(0, 36, 5), torch.linspace(0.1, 3.0, 8))
    state = buf.state_dict()
    assert state["frames"].shape == (36, 3)                               # only the filled part
    assert buf.nbytes() == sum(v.nelement() * v.element_size() for v in state.values() if torch.is_tensor(v))
    other = ReplayBuffer(1000, 3, (3,), 2, 3, frame_dtype=np.float32)
    other.load_state_dict(state)
    a = buf.sample(10, 3, 2, 0.5, gen(5))
    b = other.sample(10, 3, 2, 0.5, gen(5))
    for field in a.__dataclass_fields__:
        assert torch.equal(getattr(a, field), getattr(b, field)), field
    # both go on identically (running episodes continue across the checkpoint)
    env2 = FakeEnvs(env.lengths, 2, 3)
    env2.__dict__.update({k: (list(v) if isinstance(v, list) else dict(v) if isinstance(v, dict) else v)
                          for k, v in env.__dict__.items()})
    for _ in range(6):
        env.step(buf)
        env2.step(other)
    for name in buf._arrays():
        assert torch.equal(getattr(buf, name)[:len(buf)], getattr(other, name)[:len(other)]), name
    assert torch.equal(buf.final_frames[:buf.num_final], other.final_frames[:other.num_final])
    with pytest.raises(ValueError):
        ReplayBuffer(1000, 2, (3,), 2, 3).load_state_dict(state)          # wrong number of envs


def test_add_refuses_data_past_capacity():
    env, buf = make([[5], [5]], steps=3, capacity=6)
    with pytest.raises(ValueError):
        env.step(buf)
