"""Cluster mode on NATS JetStream: ingest nodes publish to a replicated stream, writers consume it
into the standalone receiver's files (see docs/scaling.md).

- ``stream``: connecting, the stream and lease bucket (create/update, status), partition hashing,
  and the one place NATS errors become the receiver's own.
- ``message``: a batch's parts <-> compressed stream messages (split by partition and size).
- ``publish``: ``StreamDestination``, the ingest node's destination behind ``receiver.ingest``.
- ``lease``: one writer per partition, through compare-and-set in a key-value bucket.
- ``writer``: the writer: a durable pull consumer per partition feeding ``PartitionedStore``.
- ``cli``: ``spoolreceiver writer`` and ``spoolreceiver stream init|status``.

The only importers of ``nats`` (nats-py) are the modules of this package. Nothing outside it
imports it except the receiver's composition root (``server.py``) and ``cli.py``.
"""
