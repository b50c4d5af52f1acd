"""The ``count`` connector."""

from agent.connectors.count.count import CountConnector, CountFactory

factory = CountFactory()

__all__ = ["CountConnector", "factory"]
