"""Rewards on device: the think/answer format parsed from completion bytes, accuracy, the listener's
confidence, a registry for new ones, and per-step metrics (contradiction rate included)."""

from lgrpo_jax.rewards.core import (REWARDS, RewardConfig, RewardError, RewardInputs, check_rewards,
                                    compute_rewards, decode_completions, register_reward, reward_metrics,
                                    text_reward)
from lgrpo_jax.rewards.text import ByteTable, Parsed, completion_bytes, parse

__all__ = ["REWARDS", "ByteTable", "Parsed", "RewardConfig", "RewardError", "RewardInputs", "check_rewards", "completion_bytes",
           "compute_rewards", "decode_completions", "parse", "register_reward", "reward_metrics",
           "text_reward"]
