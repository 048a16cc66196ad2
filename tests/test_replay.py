"""Replay buffer against EZ_SPEC §1 (stacks), §4.2 (batch layout), §4.4 (PER) and the lockstep contract."""

import numpy as np
import pytest

from replay import ReplayBuffer


class FakeEnvs:
    """E envs in lockstep; env e plays episodes of the lengths lengths[e] (cycled).

    Frame of env e at step k of its n-th episode: [e, n, k]; the final observation (after the last
    action) is [e, n, L]. Observations are stacks of S frames that repeat the first frame at the start,
    as atari.py makes them. action = (k + e) % A, raw reward = ((k % 3) - 1) * 2.5, root value = 10 e + k.
    """

    def __init__(self, lengths, stack=2, num_actions=3):
        self.lengths, self.S, self.A = lengths, stack, num_actions
        self.E = len(lengths)
        self.n = [0] * self.E      # episode number per env
        self.k = [0] * self.E      # step in the episode per env
        self.ref = []              # per global index: (e, n, k, L)
        self.steps_of_episode = {}  # (e, n) -> steps played so far

    def L(self, e, n):
        return self.lengths[e][n % len(self.lengths[e])]

    def obs(self, e, n, k, final=False):
        frames = [[e, n, max(k - self.S + 1 + s, 0)] for s in range(self.S)]
        return np.array(frames, np.float32).reshape(-1)                  # [S * 3] frame-major

    def visit_dist(self, e, k):
        d = np.zeros(self.A, np.float32)
        d[(k + e) % self.A] = 0.75
        d[(k + e + 1) % self.A] += 0.25
        return d

    def step(self, buf):
        obs, act, rew, done, rv, vis, fin = [], [], [], [], [], [], []
        for e in range(self.E):
            n, k, L = self.n[e], self.k[e], self.L(e, self.n[e])
            self.ref.append((e, n, k, L))
            obs.append(self.obs(e, n, k))
            act.append((k + e) % self.A)
            rew.append(((k % 3) - 1) * 2.5)
            done.append(k == L - 1)
            rv.append(10 * e + k)
            vis.append(self.visit_dist(e, k))
            fin.append(self.obs(e, n, L))                                 # final stack ends with [e, n, L]
            self.steps_of_episode[(e, n)] = k + 1
            if k == L - 1:
                self.n[e], self.k[e] = n + 1, 0
            else:
                self.k[e] = k + 1
        buf.add(np.stack(obs), np.array(act), np.array(rew, np.float32), np.array(done), np.array(rv, np.float32),
                np.stack(vis), np.stack(fin))

    def ended(self, e, n):
        return self.steps_of_episode.get((e, n), 0) == self.L(e, n)


def make(lengths, steps, stack=2, num_actions=3, capacity=1000):
    env = FakeEnvs(lengths, stack, num_actions)
    buf = ReplayBuffer(capacity, len(lengths), (3,), stack, num_actions, frame_dtype=np.float32)
    for _ in range(steps):
        env.step(buf)
    return env, buf


def expected_stack(env, e, n, step, L, ended):
    """Frames step-S+1..step of the episode: first frame repeated before it, final obs after it."""
    out = []
    for s in range(env.S):
        q = max(step - env.S + 1 + s, 0)
        if ended:
            q = min(q, L)                                                 # q == L is the final observation
        out.append([e, n, q])
    return np.array(out, np.float32).reshape(-1)


# ---------------------------------------------------------------------------------------------
# Batch assembly (EZ_SPEC §4.2) on lockstep data with episodes ending at different times
# ---------------------------------------------------------------------------------------------

def test_every_sampleable_transition_assembles_its_batch_correctly():
    K, td = 3, 2
    W = K + td
    env, buf = make([[4, 7], [9], [2, 3, 1]], steps=14, stack=2, num_actions=3)
    assert len(buf) == 14 * 3
    B = buf.num_sampleable(K, td)
    batch = buf.sample(B, K, td, beta=0.4, rng=np.random.default_rng(0))   # every sampleable one, once
    assert sorted(batch.indices.tolist()) == sorted(set(batch.indices.tolist()))
    for b, t in enumerate(batch.indices):
        e, n, k, L = env.ref[t]
        ended = env.ended(e, n)
        left = min(L - k, W + 1) if ended else W + 1
        assert batch.episode_left[b] == left
        assert batch.ages[b] == len(buf) - t
        for m in range(K + 1):
            np.testing.assert_array_equal(batch.obs[b, m], expected_stack(env, e, n, k + m, L, ended))
            if k + m < L:
                assert batch.root_values[b, m] == 10 * e + k + m
                np.testing.assert_array_equal(batch.child_visits[b, m], env.visit_dist(e, k + m))
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
    rng = np.random.default_rng(1)
    past = []
    for _ in range(200):
        batch = buf.sample(8, 5, 5, beta=1.0, rng=rng)
        past.append(batch.actions[batch.mask == 0])
    counts = np.bincount(np.concatenate(past), minlength=4)
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
    # the stored stacks rebuild exactly the observations that were added
    np.testing.assert_array_equal(buf.stacks(np.arange(6), np.zeros(6, int)), np.stack([o for o, _ in seq]))
    # from t = 0: offset 3 is the final observation, beyond it the final frame repeats
    np.testing.assert_array_equal(buf.stacks(np.zeros(3, int), np.array([3, 4, 6])),
                                  np.stack([stack(0, 1, 2, 3), stack(1, 2, 3, 3), stack(3, 3, 3, 3)]))
    # frames before the second episode's start repeat its first frame, not the previous episode's frames
    np.testing.assert_array_equal(buf.stacks(np.array([3]), np.array([0])), stack(4, 4, 4, 4)[None])


def test_final_obs_in_lockstep_goes_to_the_right_episode():
    env, buf = make([[3], [5], [2]], steps=10, stack=2)
    for t, (e, n, k, L) in enumerate(env.ref):
        if env.ended(e, n):
            got = buf.stacks(np.array([t]), np.array([L - k]))[0]         # the step after the last action
            np.testing.assert_array_equal(got, expected_stack(env, e, n, L, L, True))
            assert got[-3:].tolist() == [e, n, L]


# ---------------------------------------------------------------------------------------------
# Sampleable rule
# ---------------------------------------------------------------------------------------------

def test_sampleable_rule():
    # E = 2; env 0: episode of 4 steps (indices 0 2 4 6) then a running one (8 10 12 14);
    # env 1 runs (1 3 ... 15). W = 5: a running transition t needs t + 5 * 2 < 16, i.e. t < 6.
    env, buf = make([[4, 100], [100]], steps=8)
    assert buf._sampleable(5).tolist() == [0, 1, 2, 3, 4, 5, 6]
    assert buf.num_sampleable(3, 2) == 7
    assert buf.num_sampleable() == 4                                      # W = 10: t < -4, only the ended episode
    for _ in range(20):
        batch = buf.sample(7, 3, 2, 0.4, np.random.default_rng(_))
        assert sorted(batch.indices.tolist()) == [0, 1, 2, 3, 4, 5, 6]


# ---------------------------------------------------------------------------------------------
# Prioritized sampling (EZ_SPEC §4.4)
# ---------------------------------------------------------------------------------------------

def filled_with_priorities(p):
    env, buf = make([[len(p)]], steps=len(p), stack=1)                    # one ended episode: all sampleable
    buf.update_priorities(np.arange(len(p)), p)
    return buf


def test_sampling_frequencies_follow_priorities():
    p = np.array([0.1, 0.5, 1.0, 2.0, 4.0, 0.3, 3.0, 1.5, 0.05, 2.5])
    buf = filled_with_priorities(p)
    rng = np.random.default_rng(123)
    draws = 8000
    counts = np.bincount([buf.sample(1, 5, 5, 0.4, rng).indices[0] for _ in range(draws)], minlength=len(p))
    expected = draws * p ** 0.6 / (p ** 0.6).sum()                       # P(i) = p_i^alpha / sum_k p_k^alpha
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert chi2 < 27.88, (counts, expected)                               # chi-square, 9 dof, p = 0.001
    # and it is not uniform: the top priority is drawn more than 4 times as often as the lowest
    assert counts[4] > 4 * counts[8]


def test_importance_weights_match_the_formula_and_no_index_repeats():
    p = np.array([0.1, 0.5, 1.0, 2.0, 4.0, 0.3, 3.0, 1.5, 0.05, 2.5])
    buf = filled_with_priorities(p)
    beta = 0.4
    batch = buf.sample(6, 5, 5, beta, np.random.default_rng(7))
    assert len(set(batch.indices.tolist())) == 6                          # without replacement
    P = p ** 0.6 / (p ** 0.6).sum()
    w = (len(p) * P[batch.indices]) ** (-beta)
    np.testing.assert_allclose(batch.weights, w / w.max(), rtol=1e-6)
    assert batch.weights.dtype == np.float32 and batch.weights.max() == 1.0


def test_new_data_gets_the_current_max_priority():
    env, buf = make([[50]], steps=3, stack=1)
    assert buf.priorities[:3].tolist() == [1.0, 1.0, 1.0]                 # the first data: 1
    buf.update_priorities(np.array([0, 1, 2]), np.array([0.2, 7.0, 0.5]))
    env.step(buf)
    assert buf.priorities[3] == 7.0
    buf.update_priorities(np.array([1, 3]), np.array([0.1, 0.3]))         # the max can go down too
    env.step(buf)
    assert buf.priorities[4] == 0.5
    assert buf.priorities[:5].tolist() == [0.2, 0.1, 0.5, 0.3, 0.5]


# ---------------------------------------------------------------------------------------------
# Checkpointing and capacity
# ---------------------------------------------------------------------------------------------

def test_state_dict_round_trip():
    env, buf = make([[4, 7], [9], [2, 3, 1]], steps=12)
    buf.update_priorities(np.arange(0, 36, 5), np.linspace(0.1, 3.0, 8))
    state = buf.state_dict()
    assert state["frames"].shape == (36, 3)                               # only the filled part
    assert buf.nbytes() == sum(v.nbytes for v in state.values() if isinstance(v, np.ndarray)) \
        - state["cur_start"].nbytes
    other = ReplayBuffer(1000, 3, (3,), 2, 3, frame_dtype=np.float32)
    other.load_state_dict(state)
    a = buf.sample(10, 3, 2, 0.5, np.random.default_rng(5))
    b = other.sample(10, 3, 2, 0.5, np.random.default_rng(5))
    for field in a.__dataclass_fields__:
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    # both go on identically (running episodes continue across the checkpoint)
    env2 = FakeEnvs(env.lengths, 2, 3)
    env2.__dict__.update({k: (list(v) if isinstance(v, list) else dict(v) if isinstance(v, dict) else v)
                          for k, v in env.__dict__.items()})
    for _ in range(6):
        env.step(buf)
        env2.step(other)
    for name in buf._arrays():
        np.testing.assert_array_equal(getattr(buf, name)[:len(buf)], getattr(other, name)[:len(other)])
    np.testing.assert_array_equal(buf.final_frames[:buf.num_final], other.final_frames[:other.num_final])
    with pytest.raises(ValueError):
        ReplayBuffer(1000, 2, (3,), 2, 3).load_state_dict(state)          # wrong number of envs


def test_add_refuses_data_past_capacity():
    env, buf = make([[5], [5]], steps=3, capacity=6)
    with pytest.raises(ValueError):
        env.step(buf)


def test_end_running_episodes_closes_them_with_the_given_final_obs():
    env, buf = make([[3], [100]], steps=4)        # env 0: an episode of 3 ended, one of 1 step running; env 1 runs
    assert buf.num_sampleable(3, 2) == 3          # indices 0 2 4 (env 0's ended episode); 6 and env 1 not
    final = np.array([[7, 7, 7, 8, 8, 8], [9, 9, 9, 5, 5, 5]], np.float32)   # [E, S * 3]
    buf.end_running_episodes(final)
    assert buf.num_sampleable(3, 2) == 8
    assert buf.dones[6] and buf.dones[7] and buf.ep_end[[1, 3, 5, 7]].tolist() == [7] * 4
    np.testing.assert_array_equal(buf.stacks(np.array([6, 1]), np.array([1, 4])),
                                  np.array([[0, 1, 0, 8, 8, 8], [1, 0, 3, 5, 5, 5]], np.float32))
    env.k = [0, 0]                                # the envs restart
    env.n = [env.n[0] + 1, env.n[1] + 1]
    env.step(buf)
    assert buf.ep_start[8] == 8 and buf.ep_start[9] == 9 and buf.ep_end[8] == -1
    buf.end_running_episodes(final)
    assert buf.ep_end[8] == 8 and buf.num_final == 5
