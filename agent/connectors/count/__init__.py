"""The ``count`` connector."""

from agent.connectors.count.count import CountConnector, factory

__all__ = ["CountConnector", "factory"]
