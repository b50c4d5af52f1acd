"""The ``drift`` connector: prediction drift, data drift and confidence collapse.

See ``connector.py`` for the behaviour, ``reference.py`` for the reference file
format, ``stats.py`` for the statistics and ``cli.py`` for ``mlagent reference``.
"""

from agent.connectors.drift.config import DriftConfig
from agent.connectors.drift.connector import DriftConnector, DriftFactory

factory = DriftFactory()

__all__ = ["DriftConfig", "DriftConnector", "DriftFactory", "factory"]
