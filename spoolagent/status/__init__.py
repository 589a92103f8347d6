"""The agent's status endpoint (``server``) and its Prometheus metrics (``metrics``, loaded at the
first scrape)."""

from spoolagent.status.server import StatusServer as StatusServer
