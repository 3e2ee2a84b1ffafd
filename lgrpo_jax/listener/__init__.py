"""The frozen listener: P(correct image) from a reasoning trace with its answer removed."""

from lgrpo_jax.listener.listener import ListenerSpec, listener_logits, listener_probs, reasoning_view, score

__all__ = ["ListenerSpec", "listener_logits", "listener_probs", "reasoning_view", "score"]
