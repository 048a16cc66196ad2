"""Environments for EfficientZero: Atari 100k games and small gymnasium control tasks, one API.

Atari follows the protocol of EZ_SPEC §1 (the official repo's wrappers): frame skip 4 with a
max-pool over the last two frames, 96x96 RGB frames (INTER_AREA), a stack of 4 frames delivered
frame-major as [E, 12, 96, 96] uint8 ([f0 R,G,B, f1 R,G,B, ...]), up to 30 no-op starts, no FIRE
on reset, no sticky actions, the minimal action set, a 108k-frame (27k agent steps) cap, and
raw (unclipped) rewards: the learner clips them. Training envs end a *learning* episode on a
life loss while the game goes on; evaluation envs play whole games (EZ_SPEC §7.1).
The emulator, frame skip, max-pool and resize run in ale_py.AtariVectorEnv's C++ threads.

Any registered gymnasium id with Box observations and Discrete actions (e.g. "CartPole-v1")
runs behind the same constructor and step/info API, with float32 observations and stack 1.

    env = make_env("MsPacman", num_envs=8, seed=0, train=True)
    obs = env.reset()                                  # [E, 12, 96, 96] uint8
    obs, reward, done, info = env.step(actions)        # actions int [E]

Autoreset happens in the same step: where done[i], obs[i] already starts the next episode and
info["final_obs"][i] is the last observation of the ended one; info["truncated"][i] says the episode was
cut by the time limit (max_episode_steps) rather than ended in a terminal state. info["game_over"] marks the end
of a whole game (all lives, or the cap), where info["episode_return"] (raw score summed over all
lives) and info["episode_length"] (agent steps) are valid. E = number of parallel envs.
"""

import difflib
import re

import ale_py
import gymnasium as gym
import numpy as np

# Atari 100k: game -> (random, human, EfficientZero paper score), EZ_SPEC §7.2
ATARI_100K = {
    "Alien": (227.8, 7127.7, 808.5),
    "Amidar": (5.8, 1719.5, 148.6),
    "Assault": (222.4, 742.0, 1263.1),
    "Asterix": (210.0, 8503.3, 25557.8),
    "BankHeist": (14.2, 753.1, 351.0),
    "BattleZone": (2360.0, 37187.5, 13871.2),
    "Boxing": (0.1, 12.1, 52.7),
    "Breakout": (1.7, 30.5, 414.1),
    "ChopperCommand": (811.0, 7387.8, 1117.3),
    "CrazyClimber": (10780.5, 35829.4, 83940.2),
    "DemonAttack": (152.1, 1971.0, 13003.9),
    "Freeway": (0.0, 29.6, 21.8),
    "Frostbite": (65.2, 4334.7, 296.3),
    "Gopher": (257.6, 2412.5, 3260.3),
    "Hero": (1027.0, 30826.4, 9315.9),
    "Jamesbond": (29.0, 302.8, 517.0),
    "Kangaroo": (52.0, 3035.0, 724.1),
    "Krull": (1598.0, 2665.5, 5663.3),
    "KungFuMaster": (258.5, 22736.3, 30944.8),
    "MsPacman": (307.3, 6951.6, 1281.2),
    "Pong": (-20.7, 14.6, 20.1),
    "PrivateEye": (24.9, 69571.3, 96.7),
    "Qbert": (163.9, 13455.0, 13781.9),
    "RoadRunner": (11.5, 7845.0, 17751.3),
    "Seaquest": (68.4, 42054.7, 1100.2),
    "UpNDown": (533.4, 11693.2, 17264.2),
}

# every ALE game: canonical CamelCase name -> ROM id ("MsPacman" -> "ms_pacman")
ALE_GAMES = {"".join(w.capitalize() for w in rom.split("_")): rom for rom in ale_py.roms.get_all_rom_ids()}
_ALE_KEYS = {name.lower(): name for name in ALE_GAMES}  # "mspacman" -> "MsPacman"


def _gym_ids():
    """Registered gymnasium ids that are not ALE games, lower case -> id ("cartpole-v1" -> "CartPole-v1")."""
    return {k.lower(): k for k, spec in gym.registry.items() if not str(spec.entry_point).startswith("ale_py")}


def canonical_game(name: str) -> str:
    """"MsPacman", "ms_pacman", "ALE/MsPacman-v5", "MsPacmanNoFrameskip-v4" -> "MsPacman";
    a registered gymnasium id that is not an ALE env (e.g. "CartPole-v1", any case) -> that id.
    Anything else raises ValueError naming up to three close names."""
    gym_ids = _gym_ids()
    if name.lower() in gym_ids:
        return gym_ids[name.lower()]  # a gymnasium task ("Blackjack-v1" is gymnasium's, "Blackjack" is ALE's)
    key = re.sub(r"^ALE/|(NoFrameskip|Deterministic)?-v\d+$", "", name).replace("_", "").lower()
    if key in _ALE_KEYS:
        return _ALE_KEYS[key]
    names = {**_ALE_KEYS, **gym_ids}
    close = difflib.get_close_matches(name.lower(), names, n=3, cutoff=0.6)
    close = close or difflib.get_close_matches(key, names, n=3, cutoff=0.6)
    hint = f"did you mean {' or '.join(names[c] for c in close)}? Or pass" if close else "pass"
    raise ValueError(f"unknown game {name!r}: {hint} an Atari 100k game (e.g. MsPacman, Pong, Breakout), "
                     f"another ALE game, or a gymnasium id with Discrete actions (e.g. CartPole-v1)")


def check_game(name: str) -> str:
    """canonical_game, and for a gymnasium task also what EfficientZero needs from it: the task can be made
    here, Box observations, Discrete actions. Raises ValueError with a one-line reason and fix."""
    game = canonical_game(name)
    if game in ALE_GAMES:
        return game
    try:
        env = gym.make(game)
    except Exception as e:  # a missing extra (box2d, mujoco, jax, shimmy) raises many kinds of error
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"{game} cannot be made here: {reason}") from None
    obs_space, act_space = env.observation_space, env.action_space
    env.close()
    if not isinstance(act_space, gym.spaces.Discrete):
        raise ValueError(f"{game} has {type(act_space).__name__} actions {act_space}; EfficientZero searches over "
                         f"Discrete actions: pick a task such as CartPole-v1 or Acrobot-v1")
    if not isinstance(obs_space, gym.spaces.Box):
        raise ValueError(f"{game} has {type(obs_space).__name__} observations {obs_space}; the MLP model needs a "
                         f"Box (vector) observation: pick a task such as CartPole-v1 or Acrobot-v1")
    return game


def human_normalized_score(game: str, score: float) -> float:
    """(score - random) / (human - random), EZ_SPEC §7.1."""
    random, human, _ = ATARI_100K[canonical_game(game)]
    return (score - random) / (human - random)


def make_env(game: str, num_envs: int, seed: int, train: bool = True, max_episode_steps: int | None = None):
    """E envs of `game` in lockstep; env i is seeded seed + i (EZ_SPEC §6, HEAD seeds)."""
    game = canonical_game(game)
    if game in ALE_GAMES:
        return AtariEnv(game, num_envs, seed, train, max_episode_steps or 27_000)
    return GymEnv(game, num_envs, seed, max_episode_steps)


class AtariEnv:
    """E Atari games in lockstep (EZ_SPEC §1); frames stacked here as [E, 4, 3, 96, 96]."""
    is_atari, stack = True, 4
    frame_shape, obs_shape = (3, 96, 96), (12, 96, 96)

    def __init__(self, game, num_envs, seed, train, max_episode_steps):
        self.game, self.num_envs, self.seed, self.train = game, num_envs, seed, train
        self.ale = ale_py.AtariVectorEnv(
            ALE_GAMES[game], num_envs,
            img_height=96, img_width=96, grayscale=False,  # EZ_SPEC §1 WarpFrame: 96x96 RGB, INTER_AREA
            frameskip=4, maxpool=True,  # MaxAndSkip: repeat 4 times, max of the last 2 frames, sum rewards
            stack_num=1,  # we stack ourselves: ALE pads a new episode with black frames, EZ repeats the first
            noop_max=30, use_fire_reset=False,  # NoopReset (ALE: 0-29 raw frames, the original 1-30); no FireReset
            repeat_action_probability=0.0, full_action_space=False,  # NoFrameskip-v4: no sticky actions, minimal set
            max_num_frames_per_episode=4 * max_episode_steps,  # TimeLimit, counted over all lives (App. B.3)
            episodic_life=False,  # ALE's episodic_life restarts the game on a life loss; we detect it in step()
            reward_clipping=False,  # raw scores; sign(r) is taken by the learner (EZ_SPEC §1 Reward)
            autoreset_mode="SameStep",  # a game over resets in the same step and returns info["final_obs"]
            # (whose newest frame, at a game over, repeats the previous step's: ALE stops before the screen grab)
        )
        self.num_actions = int(self.ale.single_action_space.n)

    def reset(self):
        frames, info = self.ale.reset(seed=self.seed)  # env i gets seed + i
        self.frames = np.repeat(frames.transpose(0, 1, 4, 2, 3), 4, axis=1)  # [E, 4, 3, 96, 96]: 4 copies at a start
        self.lives = info["lives"].copy()  # [E]
        self.episode_return = np.zeros(self.num_envs, np.float64)  # [E] raw score of the game so far
        self.episode_length = np.zeros(self.num_envs, np.int64)  # [E]
        return self.frames.reshape(self.num_envs, *self.obs_shape).copy()

    def step(self, actions):
        E = self.num_envs
        frames, reward, terminated, truncated, info = self.ale.step(np.asarray(actions, dtype=np.int64))
        game_over = terminated | truncated  # [E] all lives lost or the cap; ALE has already reset these games
        frame = frames[:, 0].transpose(0, 3, 1, 2)  # [E, 3, 96, 96] newest frame (of the new game where game_over)
        self.frames[:, :-1] = self.frames[:, 1:]  # shift the stack by one frame
        self.frames[:, -1] = frame
        if game_over.any():  # the ended game's last frame
            self.frames[game_over, -1] = info["final_obs"][game_over, 0].transpose(0, 3, 1, 2)
        final_obs = self.frames.reshape(E, *self.obs_shape).copy()  # [E, 12, 96, 96], rows valid where done

        # EpisodicLife (EZ_SPEC §1, training only): a life loss ends the learning episode, the game goes on.
        # The new episode starts from the current frame (the original takes one more NOOP step first).
        lives_dropped = info["lives"] < self.lives  # [E]
        life_lost = lives_dropped & ~game_over  # [E]
        self.lives = info["lives"].copy()  # after a game over: the new game's lives
        done = (game_over | life_lost) if self.train else game_over  # [E]
        cut = truncated & ~terminated & ~(lives_dropped & self.train)  # [E] ended by the time limit alone
        self.frames[done] = frame[done][:, None]  # new episode: 4 copies of its first frame

        self.episode_return += reward
        self.episode_length += 1
        info = dict(final_obs=final_obs, game_over=game_over, truncated=cut, lives=self.lives.copy(),
                    episode_return=self.episode_return.copy(), episode_length=self.episode_length.copy())
        self.episode_return[game_over] = 0
        self.episode_length[game_over] = 0
        obs = self.frames.reshape(E, *self.obs_shape).copy()  # [E, 12, 96, 96]
        return obs, reward.astype(np.float32), done, info

    def close(self):
        self.ale.close()


class GymEnv:
    """E gymnasium envs stepped in a Python loop; observations flattened to float32 [E, D]."""
    is_atari, stack = False, 1

    def __init__(self, game, num_envs, seed, max_episode_steps):
        self.game, self.num_envs, self.seed = game, num_envs, seed
        self.envs = [gym.make(game, max_episode_steps=max_episode_steps) for _ in range(num_envs)]
        obs_space, act_space = self.envs[0].observation_space, self.envs[0].action_space
        if not (isinstance(obs_space, gym.spaces.Box) and isinstance(act_space, gym.spaces.Discrete)):
            self.close()
            raise ValueError(f"{game}: need Box observations and Discrete actions, got {obs_space}, {act_space}")
        self.frame_shape = self.obs_shape = (int(np.prod(obs_space.shape)),)
        self.num_actions = int(act_space.n)
        self.action_start = int(act_space.start)

    def reset(self):
        self.obs = np.stack([env.reset(seed=self.seed + i)[0].reshape(-1) for i, env in enumerate(self.envs)])
        self.obs = self.obs.astype(np.float32)  # [E, D]
        self.episode_return = np.zeros(self.num_envs, np.float64)  # [E]
        self.episode_length = np.zeros(self.num_envs, np.int64)  # [E]
        return self.obs.copy()

    def step(self, actions):
        reward = np.zeros(self.num_envs, np.float32)  # [E]
        done = np.zeros(self.num_envs, bool)  # [E]
        cut = np.zeros(self.num_envs, bool)  # [E] ended by the time limit, not a terminal state
        final_obs = np.zeros_like(self.obs)  # [E, D]
        for i, (env, a) in enumerate(zip(self.envs, np.asarray(actions))):
            o, reward[i], terminated, truncated, _ = env.step(int(a) + self.action_start)
            if terminated or truncated:
                done[i], cut[i], final_obs[i] = True, truncated and not terminated, o.reshape(-1)
                o, _ = env.reset()  # later resets draw from the env's own seeded RNG
            self.obs[i] = o.reshape(-1)
        self.episode_return += reward
        self.episode_length += 1
        info = dict(final_obs=final_obs, game_over=done.copy(), truncated=cut,
                    episode_return=self.episode_return.copy(), episode_length=self.episode_length.copy())
        self.episode_return[done] = 0
        self.episode_length[done] = 0
        return self.obs.copy(), reward, done, info

    def close(self):
        for env in self.envs:
            env.close()
