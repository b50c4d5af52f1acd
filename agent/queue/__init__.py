"""Sending queues for exporters: bounded, optionally persistent, with retry and backoff.

An exporter wraps its ``send(batch)`` coroutine in a ``QueuedSender`` and its
``consume`` becomes ``await self.sender.put(batch)``. ``put`` returns once the batch
is safe in the queue (persisted, for a persistent queue); that is what lets the
receiver acknowledge its sender. ``send`` raises ``RetryableError`` (retried with
backoff, honouring ``retry_after``) or ``PermanentError`` (dropped and counted).
The guarantee and the files on disk are described in README.md.
"""

from agent.queue.config import QueueConfig, RetryConfig
from agent.queue.memory import MemoryAccountant
from agent.queue.sender import QueuedSender
from agent.queue.store import QueueStorageError

__all__ = ["MemoryAccountant", "QueueConfig", "QueueStorageError", "QueuedSender", "RetryConfig"]
