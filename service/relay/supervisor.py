"""The supervisor: builds the relay's stages around the adapters it is given, runs them
in one TaskGroup, answers health and readiness, and shuts them down in order.

Shutdown, once `stop` is set, in phases each bounded by `asyncio.timeout`:
1. intake stops reading (within a poll) and hands over its open batches;
2. the uploaders send what is queued and those batches until `shutdown_timeout_s`,
   then start nothing new; requests under way get `upload_grace_s` to finish;
3. the task poller is cancelled (it only reads; what it handed on is committed next);
4. the committer commits what is queued, within `COMMIT_DEADLINE_S`.
So the relay exits within shutdown_timeout_s + upload_grace_s + COMMIT_DEADLINE_S.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable, Collection
from typing import Final

import structlog
from aiokafka import ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError
from tenacity import RetryCallState, retry_if_result

from service.core.batching import Batcher
from service.core.resilience import Backoff, BreakerState
from service.metrics import RelayMetrics
from service.relay.admission import Admission
from service.relay.book import OffsetBook
from service.relay.committer import Committer, Membership
from service.relay.config import RelayConfig
from service.relay.health import ApiHealth
from service.relay.intake import Intake
from service.relay.ledger import KnownTasks, LedgerView, WrittenRecords
from service.relay.messages import IntakeMessage, LedgerChange, Mailbox
from service.relay.poller import PollerMember, TaskPoller
from service.relay.ports import (
    InputConsumer,
    KafkaAdmin,
    LedgerConsumer,
    RateShare,
    ScantrustApi,
    TransactionalProducer,
)
from service.relay.uploaders import Uploaders
from service.retrying import backoff_wait, call_with_retries, last_result
from service.scantrust.limits import INPUT, LEDGER
from service.scantrust.outcomes import AuthFailed, Misconfigured

log = structlog.get_logger(__name__)

KAFKA_PROBE_EVERY: Final = 5  # heartbeats (seconds)
KAFKA_PROBE_TIMEOUT_S: Final = 5.0
COMMIT_DEADLINE_S: Final = 10.0
# Messages a stage's inbox holds before senders wait: thousands of tasks' worth, many
# times the unfinished tasks a relay allows itself.
INBOX_SIZE: Final = 10_000


class Relay:
    """The relay's stages under one supervisor; adapters are passed in, started."""

    def __init__(
        self,
        config: RelayConfig,
        *,
        consumer: InputConsumer,
        producer: TransactionalProducer,
        ledger_reader: LedgerConsumer,
        poller_member: PollerMember,
        admin: KafkaAdmin,
        client: ScantrustApi,
        metrics: RelayMetrics,
        clock: Callable[[], float] | None = None,
        membership: Membership | None = None,
        result_membership: Membership | None = None,
        rate_share: RateShare | None = None,
        partitions_of: Callable[[str], Collection[int] | None] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self._config = config
        self._rate_share = rate_share
        self._partitions_of = partitions_of or (lambda _topic: None)
        self._admin = admin
        self._client = client
        self._metrics = metrics
        self._clock = clock or (lambda: asyncio.get_running_loop().time())
        self.last_beat = 0.0
        self.kafka_reachable = True
        self.health = ApiHealth(metrics)
        self._backoff = Backoff(config.api.retry_initial_s, config.api.retry_max_backoff_s)
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not cryptography
        book = OffsetBook()
        written = WrittenRecords()
        # The ledger view and the uploaders note the tasks recorded; lookups read it.
        known = KnownTasks()
        intake_inbox: Mailbox[IntakeMessage] = Mailbox(INBOX_SIZE)
        poller_inbox: Mailbox[LedgerChange] = Mailbox(INBOX_SIZE)
        self._committer = Committer(
            config,
            producer=producer,
            accounting=book,
            written=written,
            metrics=metrics,
            membership=membership,
        )
        self._uploaders = Uploaders(
            config,
            api=client,
            committer=self._committer,
            intake=intake_inbox,
            health=self.health,
            metrics=metrics,
            owns=book.owns,
            rng=self._rng,
            known=known,
        )
        batcher = Batcher(
            max_values=config.batching.batch_max_values,
            max_bytes=config.batching.batch_max_bytes,
            max_keys=config.batching.batch_max_keys,
            linger_s=config.batch_linger_s,
            max_open_batches=config.batching.max_open_batches,
        )
        self._ledger = LedgerView(
            reader=ledger_reader,
            ends=poller_member,
            written=written,
            intake=intake_inbox,
            poller=poller_inbox,
            metrics=metrics,
            clock=self._clock,
            known=known,
        )
        self._intake = Intake(
            config,
            consumer=consumer,
            group_offsets=admin,
            inbox=intake_inbox,
            admission=Admission(batcher),
            book=book,
            uploaders=self._uploaders,
            committer=self._committer,
            health=self.health,
            metrics=metrics,
            clock=self._clock,
            ledger=self._ledger,
            generation=lambda: (
                getattr(membership.group(), "generation_id", None)
                if membership is not None
                else None
            ),
        )
        self._poller = TaskPoller(
            config,
            inbox=poller_inbox,
            member=poller_member,
            ledger=self._ledger,
            api=client,
            committer=self._committer,
            health=self.health,
            metrics=metrics,
            clock=self._clock,
            wrap_listener=lambda inner: self._sharing(inner, LEDGER, config.kafka.tasks_topic),
            membership=result_membership,
        )

    def rebalance_listener(self) -> ConsumerRebalanceListener:
        """The listener to subscribe the input consumer with."""
        return self._sharing(
            self._intake.rebalance_listener(), INPUT, self._config.kafka.input_topic
        )

    def _sharing(
        self, inner: ConsumerRebalanceListener, role: str, topic: str
    ) -> ConsumerRebalanceListener:
        if self._rate_share is None:
            return inner
        return _SharingRebalance(inner, self._rate_share, role, topic, self._partitions_of)

    async def run(self, stop: asyncio.Event) -> None:
        """Run every stage until `stop` is set, then shut down in order (see above)."""
        async with asyncio.TaskGroup() as group:
            committer = group.create_task(self._committer.run(), name="committer")
            ledger = group.create_task(self._ledger.run(), name="ledger-view")
            poller = group.create_task(self._poller.run(), name="poller")
            group.create_task(self._uploaders.run(), name="uploaders")
            heartbeat = group.create_task(self._heartbeat(), name="heartbeat")
            check = group.create_task(self._check_api(), name="api-check")
            final = await self._intake.run(stop)
            config = self._config
            await self._uploaders.drain(
                final, config.batching.shutdown_timeout_s, config.upload_grace_s
            )
            poller.cancel()
            try:
                async with asyncio.timeout(COMMIT_DEADLINE_S):
                    await self._committer.close()
                    await committer
            except TimeoutError:
                log.error("relay_shutdown_commit_deadline", deadline_s=COMMIT_DEADLINE_S)
            ledger.cancel()
            heartbeat.cancel()
            check.cancel()

    # -- health and readiness ---------------------------------------------------------

    def readiness(self) -> list[str]:
        """Why the relay is not ready; empty when it is."""
        reasons = []
        if not self.kafka_reachable:
            reasons.append("Kafka unreachable")
        if not self._ledger.caught_up.is_set():
            reasons.append("starting: reading the ledger")
        if not self.health.checked:
            reasons.append("starting: checking the API (GET /api/v2/me/)")
        if self.health.auth_failed is not None:
            reasons.append(f"API authentication failed ({self.health.auth_failed.status})")
        if self.health.misconfigured is not None:
            status = self.health.misconfigured.status
            reasons.append(f"API refuses the relay's requests ({status}): check the base URL")
        if self._client.breaker_state is not BreakerState.CLOSED:
            reasons.append("API circuit breaker open")
        reasons.extend(self._intake.stopped_reasons())
        reasons.extend(self._ledger.stopped.reasons())
        return reasons

    async def _heartbeat(self) -> None:
        """Proves the event loop runs (/healthz), refreshes the gauges once a second, and
        asks Kafka for its metadata every few seconds (readiness)."""
        beats = 0
        while True:
            self.last_beat = self._clock()
            if beats % KAFKA_PROBE_EVERY == 0:
                await self.probe_kafka()
                # A rotated token is taken up here; refused uploads then probe with it.
                await self._client.reload_token()
            metrics = self._metrics
            metrics.ready.set(0 if self.readiness() else 1)
            self._poller.refresh_gauges()
            await self._intake.refresh_gauges()
            beats += 1
            await asyncio.sleep(1.0)

    async def _check_api(self) -> None:
        """Before intake reads anything: does the API accept the token and the base URL?
        One attempt per probe: a refusal is probed again with backoff until fixed; an
        outage is not a refusal, and intake starts (uploads wait the outage out)."""

        def refused(state: RetryCallState) -> None:
            self.health.refused("me", last_result(state))

        await call_with_retries(
            lambda: self._client.me(retry=False),
            retry=retry_if_result(lambda outcome: isinstance(outcome, AuthFailed | Misconfigured)),
            wait=backoff_wait(self._backoff, self._rng),
            before_sleep=refused,
        )
        self.health.accepted("me")

    async def probe_kafka(self) -> None:
        """One metadata request, bounded: the client libraries reconnect silently, so
        reachability is asked, not inferred."""
        try:
            async with asyncio.timeout(KAFKA_PROBE_TIMEOUT_S):
                await self._admin.list_topics()
        except (KafkaError, OSError, TimeoutError) as exc:
            if self.kafka_reachable:
                log.error("kafka_unreachable", error=f"{type(exc).__name__}: {exc}")
            self.kafka_reachable = False
            return
        if not self.kafka_reachable:
            log.info("kafka_reachable_again")
        self.kafka_reachable = True


class _SharingRebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    """Divides the account's rate limits by the partitions this replica was assigned,
    before the stage's own listener starts work on them (docs/design.md section 12)."""

    def __init__(
        self,
        inner: ConsumerRebalanceListener,
        share: RateShare,
        role: str,
        topic: str,
        partitions_of: Callable[[str], Collection[int] | None],
    ) -> None:
        self._inner = inner
        self._share = share
        self._role = role
        self._topic = topic
        self._partitions_of = partitions_of

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        # The share stays until the next assignment: uploads still under way at a revoke
        # finish in this replica's slots (never in its window as the only sender).
        self._share.revoking(self._role)
        await self._inner.on_partitions_revoked(revoked)

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        owned = {tp.partition for tp in assigned if tp.topic == self._topic}
        total = len(self._partitions_of(self._topic) or ()) or max(owned, default=-1) + 1
        self._share.assigned(self._role, owned, total)
        log.info("rate_share", role=self._role, partitions=sorted(owned), of=total)
        await self._inner.on_partitions_assigned(assigned)
