"""Streaming generation with a KV cache, the interactive world-model mode, video writers.

Public API:
  StreamingSampler, Chunk, stream, generate, chunk_noise   (streaming.py)
  reference_generate                                        (reference.py)
  TimeSchedule, CacheLayout, cache_capacity, chunk_bounds   (plan.py)
  ActionSource, check_actions, parse_action_tokens          (actions.py)
"""

from crm_jax.sampling.actions import ActionSource, check_actions, parse_action_tokens
from crm_jax.sampling.plan import CacheLayout, TimeSchedule, cache_capacity, chunk_bounds, make_schedule
from crm_jax.sampling.reference import reference_generate
from crm_jax.sampling.streaming import Chunk, StreamingSampler, chunk_noise, generate, stream

__all__ = [
    "ActionSource",
    "check_actions",
    "parse_action_tokens",
    "CacheLayout",
    "TimeSchedule",
    "cache_capacity",
    "chunk_bounds",
    "make_schedule",
    "reference_generate",
    "Chunk",
    "StreamingSampler",
    "chunk_noise",
    "generate",
    "stream",
]
