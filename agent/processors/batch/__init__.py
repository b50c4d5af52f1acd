"""The ``batch`` processor."""

from agent.processors.batch.batch import BatchFactory, BatchProcessor

factory = BatchFactory()

__all__ = ["BatchProcessor", "factory"]
