"""The ``batch`` processor."""

from agent.processors.batch.batch import BatchProcessor, factory

__all__ = ["BatchProcessor", "factory"]
