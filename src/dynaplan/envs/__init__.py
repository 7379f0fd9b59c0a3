"""Text game environments (gymnasium API): Crafter with BALROG-style text, and POGS.

Contract every text env keeps (the agent, teachers, data and evaluation rely on it):

* `reset(seed=...) -> (obs: str, info)`, `step(action) -> (obs, reward, terminated, truncated, info)`;
  `action` is an index into `action_names` or one of those names; anything else raises ValueError.
* `action_names: tuple[str, ...]` (the strings the agent writes) and `default_action: str` (played
  when the agent's answer cannot be parsed).
* `rules: str`: the game's rules, the action list with descriptions (and, for Crafter, the 22
  achievements), for the system prompt.
* `info["history_text"]`: the compact part of the observation that is kept in the prompt history
  (Crafter: what is seen and faced; POGS: the whole observation).
* `info["achievements"]`: {name: first_unlock_step} for what was unlocked so far (POGS: {"reach_target": step} when reached).
* `info["progression"]`: the episode's progression so far (Crafter: distinct achievements / 22; POGS: max(0, total_reward / 100)).
"""

from __future__ import annotations

ENV_NAMES: tuple[str, ...] = ("crafter", "pogs")


def make_env(name: str, **kwargs):
    """Build a text env by name with its keyword settings (see each env's constructor)."""
    if name == "crafter":
        from dynaplan.envs.crafter_text import CrafterTextEnv

        return CrafterTextEnv(**kwargs)
    if name == "pogs":
        from dynaplan.envs.pogs import PogsEnv

        return PogsEnv(**kwargs)
    raise ValueError(f"unknown env {name!r}; expected one of {', '.join(ENV_NAMES)}")
