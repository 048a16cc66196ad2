"""Tests of atari.py: the Atari protocol of EZ_SPEC §1, the score table of §7.2, gymnasium tasks."""

import numpy as np
import pytest
from ale_py import AtariVectorEnv

import atari


def frames_of(obs):
    """[E, 12, 96, 96] -> [E, 4, 3, 96, 96]"""
    return obs.reshape(obs.shape[0], 4, 3, 96, 96)


def test_atari_shapes_and_frame_major_stack():
    env = atari.make_env("MsPacman", 2, seed=0)
    assert (env.is_atari, env.game, env.stack, env.num_envs) == (True, "MsPacman", 4, 2)
    assert env.obs_shape == (12, 96, 96) and env.frame_shape == (3, 96, 96)
    assert env.num_actions == 9  # MsPacman's minimal action set
    obs = env.reset()
    assert obs.shape == (2, 12, 96, 96) and obs.dtype == np.uint8
    f = frames_of(obs)
    assert all(np.array_equal(f[:, k], f[:, 3]) for k in range(3))  # a start is 4 copies of the first frame
    # the newest frame is AtariVectorEnv's RGB frame [96, 96, 3] moved to [3, 96, 96]
    raw = AtariVectorEnv("ms_pacman", 2, img_height=96, img_width=96, grayscale=False, noop_max=30,
                         use_fire_reset=False, reward_clipping=False)
    raw_obs, _ = raw.reset(seed=0)  # [E, 4, 96, 96, 3]
    assert np.array_equal(f[:, 3], raw_obs[:, -1].transpose(0, 3, 1, 2))
    rng = np.random.default_rng(0)
    for _ in range(40):
        actions = rng.integers(0, env.num_actions, 2)
        prev = obs
        obs, reward, done, info = env.step(actions)
        raw_obs, *_ = raw.step(actions)
        assert obs.shape == (2, 12, 96, 96) and obs.dtype == np.uint8
        assert reward.shape == (2,) and reward.dtype == np.float32
        assert done.shape == (2,) and done.dtype == bool and not done.any()
        assert info["final_obs"].shape == (2, 12, 96, 96) and info["game_over"].dtype == bool
        assert info["episode_return"].shape == (2,) and info["episode_length"].shape == (2,)
        assert np.array_equal(obs[:, :9], prev[:, 3:])  # oldest frame drops out, frames stay frame-major
        assert np.array_equal(frames_of(obs)[:, 3], raw_obs[:, -1].transpose(0, 3, 1, 2))
    assert not np.array_equal(obs[:, 9:], obs[:, :3])  # the game moved
    env.close()
    raw.close()


def test_life_loss_ends_training_episode_but_game_goes_on():
    # the same seed and actions in a training and an evaluation env: one emulator trajectory
    train, evaluate = atari.make_env("MsPacman", 1, seed=0, train=True), atari.make_env("MsPacman", 1, seed=0, train=False)
    obs_t, obs_e = train.reset(), evaluate.reset()
    rng = np.random.default_rng(0)
    lives = 3
    for step in range(600):  # MsPacman under random actions loses its first life after ~115 steps
        a = rng.integers(0, train.num_actions, 1)
        prev_t = obs_t
        obs_t, _, done_t, info_t = train.step(a)
        obs_e, _, done_e, info_e = evaluate.step(a)
        if info_t["lives"][0] < lives:
            break
        assert not done_t[0] and not done_e[0]
    assert info_t["lives"][0] == info_e["lives"][0] == 2
    assert done_t[0] and not info_t["game_over"][0]  # training: the learning episode ends, not the game
    assert not done_e[0] and not info_e["game_over"][0]  # evaluation: nothing ends
    # training autoreset: the final obs continues the old stack, the new episode repeats the current frame
    assert np.array_equal(info_t["final_obs"][:, :9], prev_t[:, 3:])
    assert np.array_equal(info_t["final_obs"][:, 9:], obs_e[:, 9:])
    assert all(np.array_equal(frames_of(obs_t)[:, k], frames_of(obs_e)[:, 3]) for k in range(4))
    # the game was not restarted: same frames as the evaluation env, fewer lives, whole-game step count
    for _ in range(20):
        a = rng.integers(0, train.num_actions, 1)
        obs_t, _, done_t, info_t = train.step(a)
        obs_e, _, done_e, info_e = evaluate.step(a)
        assert np.array_equal(obs_t[:, 9:], obs_e[:, 9:])
        assert info_t["lives"][0] == 2 and not done_t[0]
    assert info_t["episode_length"][0] == step + 1 + 20
    train.close()
    evaluate.close()


def test_game_over_autoreset_raw_returns_and_lengths():
    cap = 120  # agent steps; the cap ends the whole game (EZ_SPEC §1 TimeLimit)
    env = atari.make_env("ms_pacman", 2, seed=3, train=False, max_episode_steps=cap)
    obs = env.reset()
    rng = np.random.default_rng(1)
    total = np.zeros(2)
    rewards = []
    for step in range(1, cap + 1):
        prev = obs
        obs, reward, done, info = env.step(rng.integers(0, env.num_actions, 2))
        total += reward
        rewards.append(reward)
        assert done.all() == (step == cap) and info["game_over"].all() == (step == cap)
    rewards = np.concatenate(rewards)
    assert rewards.max() >= 10 and np.all(rewards % 10 == 0)  # raw MsPacman scores: a pellet is 10
    assert np.array_equal(info["episode_return"], total)  # whole-game raw return
    assert np.array_equal(info["episode_length"], [cap, cap])
    assert np.array_equal(info["final_obs"][:, :9], prev[:, 3:])  # last observation of the ended game
    f = frames_of(obs)
    assert all(np.array_equal(f[:, k], f[:, 3]) for k in range(3))  # the new game starts with 4 copies
    assert not np.array_equal(obs[:, 9:], info["final_obs"][:, 9:])
    assert np.array_equal(info["lives"], [3, 3])  # a fresh game
    _, _, _, info = env.step(rng.integers(0, env.num_actions, 2))
    assert np.array_equal(info["episode_length"], [1, 1])
    env.close()


def run_frames(seed, num_envs, actions):
    env = atari.make_env("MsPacman", num_envs, seed=seed)
    out = [env.reset()]
    out += [env.step(a)[0] for a in actions]
    env.close()
    return np.stack(out)  # [T+1, E, 12, 96, 96]


def test_seeding():
    actions = np.random.default_rng(0).integers(0, 9, (30, 2))  # [T, E]
    a, b = run_frames(0, 2, actions), run_frames(0, 2, actions)
    assert np.array_equal(a, b)  # same seed, same frames
    assert not np.array_equal(a[:, 0], a[:, 1])  # env 0 and env 1 get different seeds
    c = run_frames(1, 1, actions[:, 1:])
    assert np.array_equal(c[:, 0], a[:, 1])  # env i is seeded seed + i
    assert not np.array_equal(c[:, 0], a[:, 0])


def test_game_names():
    for name in ["MsPacman", "ms_pacman", "ALE/MsPacman-v5", "MsPacmanNoFrameskip-v4", "MsPacman-v4"]:
        assert atari.canonical_game(name) == "MsPacman"
    assert atari.canonical_game("up_n_down") == "UpNDown"
    assert atari.canonical_game("PongNoFrameskip-v4") == "Pong"
    assert atari.canonical_game("CartPole-v1") == "CartPole-v1"  # a gymnasium id
    assert atari.canonical_game("Blackjack-v1") == "Blackjack-v1"  # gymnasium's, while "Blackjack" is ALE's
    assert atari.canonical_game("Blackjack") == "Blackjack"
    assert set(atari.ATARI_100K) <= set(atari.ALE_GAMES) and len(atari.ATARI_100K) == 26
    env = atari.make_env("ALE/Pong-v5", 1, seed=0)
    assert env.game == "Pong" and env.num_actions == 6
    env.close()


def test_unknown_game_suggests_close_names_in_one_short_line():
    with pytest.raises(ValueError) as e:
        atari.make_env("MsPacmann", 1, seed=0)
    msg = str(e.value)
    assert msg.startswith("unknown game 'MsPacmann': did you mean MsPacman") and "CartPole-v1" in msg
    assert len(msg) < 250 and "\n" not in msg                  # not the list of all 100+ ALE games
    assert "did you mean CartPole-v1" in str(pytest.raises(ValueError, atari.canonical_game, "Cartpole").value)
    assert "did you mean" not in str(pytest.raises(ValueError, atari.canonical_game, "xyzzy").value)
    assert atari.canonical_game("cartpole-v1") == "CartPole-v1"  # gymnasium ids in any case
    assert atari.check_game("Acrobot-v1") == "Acrobot-v1" and atari.check_game("pong") == "Pong"
    with pytest.raises(ValueError, match="Pendulum-v1 has Box actions"):
        atari.check_game("Pendulum-v1")                           # continuous actions
    with pytest.raises(ValueError, match="Discrete observations"):
        atari.check_game("FrozenLake-v1")                         # no vector observation
    with pytest.raises(ValueError):
        atari.make_env("Pendulum-v1", 1, seed=0)


def test_human_normalized_score():
    assert atari.human_normalized_score("Pong", -20.7) == 0.0
    assert atari.human_normalized_score("ms_pacman", 6951.6) == pytest.approx(1.0)
    assert atari.human_normalized_score("Breakout", 414.1) == pytest.approx(14.319, abs=1e-3)  # EZ_SPEC §7.2
    hns = [atari.human_normalized_score(g, ez) for g, (_, _, ez) in atari.ATARI_100K.items()]
    assert np.mean(hns) == pytest.approx(1.943, abs=1e-3)  # the paper's mean and median
    assert np.median(hns) == pytest.approx(1.090, abs=1e-3)
    assert sum(h > 1 for h in hns) == 14


def test_cartpole_same_api():
    env = atari.make_env("CartPole-v1", 3, seed=0)
    assert (env.is_atari, env.stack, env.obs_shape, env.frame_shape, env.num_actions) == (False, 1, (4,), (4,), 2)
    obs = env.reset()
    assert obs.shape == (3, 4) and obs.dtype == np.float32
    ends = 0
    for step in range(1, 40):  # always push left: the pole falls within ~10 steps
        obs, reward, done, info = env.step(np.zeros(3, np.int64))
        assert reward.dtype == np.float32 and done.dtype == bool
        assert np.array_equal(info["game_over"], done)
        for i in np.flatnonzero(done):
            x, _, theta, _ = info["final_obs"][i]
            assert abs(theta) > 0.2095 or abs(x) > 2.4  # the terminal state of the ended episode
            assert np.all(np.abs(obs[i]) <= 0.05)  # a fresh start (uniform in [-0.05, 0.05])
            assert info["episode_return"][i] == info["episode_length"][i] > 0  # reward 1 per step
            ends += 1
    assert ends >= 3
    env.close()
    # same seed, same observations; the cap truncates
    a, b = atari.make_env("CartPole-v1", 2, seed=5, max_episode_steps=4), atari.make_env("CartPole-v1", 2, seed=5)
    assert np.array_equal(a.reset(), b.reset())
    for step in range(1, 5):
        _, _, done, info = a.step(np.array([0, 1]) if step % 2 else np.array([1, 0]))
    assert done.all() and np.array_equal(info["episode_length"], [4, 4])
