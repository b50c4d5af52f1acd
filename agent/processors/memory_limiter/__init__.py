"""``memory_limiter`` processor: refuses data above soft limits so that senders back off."""

from agent.processors.memory_limiter.processor import MemoryLimiter, factory

__all__ = ["MemoryLimiter", "factory"]
