"""The relay: consume, validate, batch, upload, record, poll, publish (docs/design.md).

One module per stage, each owning its state and its loop, under one supervisor:

- intake (`intake.py`, with `reader.py`, `judging.py`, `admission.py`, `claims.py`,
  `book.py`, `rebalance.py` and `catch_up.py`): reads the input topic, validates,
  holds back changes that would overtake an unfinished one, batches the rest,
  pauses while a bound is reached or the API is unavailable;
- uploaders (`uploaders.py`): upload ready batches and own their retries;
- committer (`committer.py`): the one transactional writer of ledger records,
  dead letters, results, tombstones and input offsets;
- ledger view (`ledger.py`): reads the whole ledger once and tells intake and
  the poller what changed;
- task poller (`poller.py`): follows the tasks of the ledger partitions it owns;
- supervisor (`supervisor.py`): builds them, runs them in one TaskGroup, and
  shuts them down in order within one deadline.

Stages talk by the typed messages of `messages.py` on bounded queues; what each
needs from Kafka and the API is a Protocol in `ports.py`.
"""

from service.relay.config import RelayConfig
from service.relay.supervisor import Relay

__all__ = ["Relay", "RelayConfig"]
