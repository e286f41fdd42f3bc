"""Every Prometheus metric of scm-relay, in one place, on an injected registry.

Names follow Prometheus practice (prefix `scm_relay_`, base units, `_total`
counters). Label sets are bounded: endpoints, status classes, reasons, states
and flush reasons are fixed vocabularies, partitions are the input topic's.
No task id, code or event id is ever a label. docs/metrics.md lists them all.
"""

from __future__ import annotations

from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from service.core.batching import FlushReason
from service.core.clock_offset import Offset
from service.core.reasons import Reason, Stage
from service.core.resilience import BreakerState

PREFIX: Final = "scm_relay"
BREAKER_VALUES: Final = {BreakerState.CLOSED: 0, BreakerState.OPEN: 1, BreakerState.HALF_OPEN: 2}
VALUE_BUCKETS: Final = (1, 10, 50, 100, 250, 500, 750, 900, 990, 1000)
LATENCY_BUCKETS: Final = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
TASK_BUCKETS: Final = (1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
ENDPOINTS: Final = ("upload", "task", "tasks_bulk", "task_list", "task_group", "me")
STATUS_CLASSES: Final = ("2xx", "3xx", "4xx", "5xx", "error")
RETRIED_OUTCOMES: Final = ("Throttled", "Unavailable", "Ambiguous")


class RelayMetrics:
    """The relay's metrics; also the API client's observer."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry

        def counter(name: str, doc: str, labels: tuple[str, ...] = ()) -> Counter:
            return Counter(f"{PREFIX}_{name}", doc, labels, registry=registry)

        def gauge(name: str, doc: str, labels: tuple[str, ...] = ()) -> Gauge:
            return Gauge(f"{PREFIX}_{name}", doc, labels, registry=registry)

        self.events_consumed = counter(
            "events_consumed_total", "Records read from the input topic."
        )
        self.events_invalid = counter(
            "events_invalid_total", "Records refused by the event contract.", ("reason",)
        )
        self.events_deduplicated = counter(
            "events_deduplicated_total",
            "Constraint values dropped because the open batch already had them.",
        )
        self.date_warnings = counter(
            "date_warnings_total", "Date-like scm_data values not written YYYY-MM-DD (accepted)."
        )
        self.events_held_back = counter(
            "events_held_back_total", "Events held back behind an unfinished change to a code."
        )
        self.events_skipped = counter(
            "events_skipped_total",
            "Records read again after a restart or rebalance and skipped: already recorded.",
        )
        self.dead_letters = counter(
            "dead_letters_total", "Records written to the dead-letter topic.", ("stage", "reason")
        )
        self.api_misconfigured = gauge(
            "api_misconfigured",
            "1 while the API answers as if the base URL were wrong (404, 405, another 4xx "
            "that is not about the data); intake is stopped.",
        )
        self.task_states_unknown = counter(
            "task_states_unknown_total",
            "Task states the API documentation does not name, seen while polling (the task "
            "is still followed).",
        )
        self.reconciliations = counter(
            "reconciliations_total",
            "Ambiguous uploads looked up by reference: the task found and adopted, or none "
            "(then the batch is sent again).",
            ("found",),
        )
        self.batches_abandoned = counter(
            "batches_abandoned_total",
            "Batches an uploader gave up because their partitions moved to another replica "
            "(their new owner resolves the intent).",
        )
        self.reconcile_lookups_unfinished = counter(
            "reconcile_lookups_unfinished_total",
            "Lookups after an ambiguous upload that could not finish: the API lists more "
            "tasks under the batch's reference than the client reads (MAX_TASK_PAGES "
            "pages). The batch waits, never resent blindly; it is looked up again.",
        )
        self.intents_resolved = counter(
            "intents_resolved_total",
            "Open intents another process (or this one before a restart) left, resolved "
            "here: the task found by reference and adopted, or none and the batch resent.",
            ("action",),
        )
        self.clock_jumps = counter(
            "clock_jumps_total",
            "Uploads refused because the wall clock disagreed with the monotonic clock by "
            "more than a second since their intent was written (a clock step, a VM "
            "suspended or migrated); each waited for a fresh intent.",
        )
        self.batches_submitted = counter(
            "batches_submitted_total", "Upload requests accepted by the API.", ("flush_reason",)
        )
        self.batch_values = Histogram(
            f"{PREFIX}_batch_values",
            "Constraint values per upload request.",
            buckets=VALUE_BUCKETS,
            registry=registry,
        )
        self.api_requests = counter(
            "api_requests_total",
            "HTTP requests to the Scantrust API by answer class (error: no answer).",
            ("endpoint", "status_class"),
        )
        self.api_request_duration = Histogram(
            f"{PREFIX}_api_request_duration_seconds",
            "Duration of HTTP requests to the Scantrust API.",
            ("endpoint",),
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.api_retries = counter(
            "api_retries_total",
            "API calls retried, by the outcome retried.",
            ("endpoint", "outcome"),
        )
        self.api_throttled = counter(
            "api_throttled_total", "429 answers from the Scantrust API.", ("endpoint",)
        )
        self.ambiguous_submissions = counter(
            "ambiguous_submissions_total",
            "Uploads sent whose answer was lost: the task may exist (the duplicate window).",
        )
        self.api_clock_offset = gauge(
            "api_clock_offset_seconds",
            "This host's wall clock minus the API's, from the answers' Date headers (the "
            "middle of the bounds they give).",
        )
        self.api_clock_offset_uncertainty = gauge(
            "api_clock_offset_uncertainty_seconds",
            "Half the width of the bounds on api_clock_offset_seconds.",
        )
        self.circuit_breaker_state = gauge(
            "api_circuit_breaker_state", "API circuit breaker: 0 closed, 1 open, 2 half-open."
        )
        self.api_auth_failed = gauge(
            "api_auth_failed", "1 while the API refuses our token (401/403): intake is stopped."
        )
        self.tasks_pending = gauge(
            "tasks_pending", "Unfinished tasks followed by this replica's poller."
        )
        self.tasks_stuck = gauge(
            "tasks_stuck", "Followed tasks unfinished past SCM_RELAY_TASK_STUCK_AFTER_S."
        )
        self.oldest_pending_task_age = gauge(
            "oldest_pending_task_age_seconds", "Age of the oldest unfinished followed task."
        )
        self.tasks_finished = counter(
            "tasks_finished_total", "Tasks finished, by final state.", ("state",)
        )
        self.tasks_short = counter(
            "tasks_short_total", "Completed tasks that touched fewer codes than expected."
        )
        self.tasks_over = counter(
            "tasks_over_total", "Completed tasks that touched more codes than expected."
        )
        self.tasks_over_codes = counter(
            "tasks_over_codes_total", "Codes touched beyond the expectation by such tasks."
        )
        self.tasks_short_codes = counter(
            "tasks_short_codes_total", "Codes expected but not touched by short tasks."
        )
        self.task_duration = Histogram(
            f"{PREFIX}_task_duration_seconds",
            "Time from submission to the end of a task.",
            ("state",),
            buckets=TASK_BUCKETS,
            registry=registry,
        )
        self.consumer_lag = gauge(
            "consumer_lag", "Records not yet read, per assigned input partition.", ("partition",)
        )
        self.partition_stopped = gauge(
            "partition_stopped",
            "1 while a partition (input or ledger) is stopped at a record batch that cannot be "
            "decoded: nothing at or after it is read or committed.",
            ("topic", "partition"),
        )
        self.intake_paused = gauge(
            "intake_paused", "1 while the input partitions are paused (backpressure or outage)."
        )
        self.ready = gauge("ready", "1 when the relay is ready (see /readyz).")
        self.last_commit = gauge(
            "last_commit_timestamp_seconds", "Unix time of the last committed Kafka transaction."
        )
        self.buffered_values = gauge(
            "buffered_values", "Constraint values read but not yet in a recorded task."
        )
        self.circuit_breaker_state.set(0)
        self._initialise_labels()

    def _initialise_labels(self) -> None:
        """Create every label combination at zero, so each series exists from the first
        scrape and rate() and absent() alerts work from the start."""
        for endpoint in ENDPOINTS:
            self.api_throttled.labels(endpoint)
            for status_class in STATUS_CLASSES:
                self.api_requests.labels(endpoint, status_class)
            for outcome in RETRIED_OUTCOMES:
                self.api_retries.labels(endpoint, outcome)
        for reason in Reason:
            if reason.stage is not Stage.API:
                self.events_invalid.labels(reason.value)
            self.dead_letters.labels(reason.stage.value, reason.value)
        for flush_reason in FlushReason:
            self.batches_submitted.labels(flush_reason.value)
        for state in ("complete", "failed"):
            self.tasks_finished.labels(state)
        for found in ("task", "none"):
            self.reconciliations.labels(found)
        for action in ("adopted", "resent"):
            self.intents_resolved.labels(action)

    # -- the API client's observer -------------------------------------------------

    def request_finished(self, endpoint: str, status_class: str, duration_s: float) -> None:
        """Count one HTTP exchange."""
        self.api_requests.labels(endpoint, status_class).inc()
        self.api_request_duration.labels(endpoint).observe(duration_s)

    def retry_scheduled(self, endpoint: str, outcome: str, wait_s: float) -> None:
        """Count one retry."""
        self.api_retries.labels(endpoint, outcome).inc()

    def throttled(self, endpoint: str) -> None:
        """Count one 429."""
        self.api_throttled.labels(endpoint).inc()

    def ambiguous(self, endpoint: str) -> None:
        """Count one upload of unknown fate."""
        self.ambiguous_submissions.inc()

    def breaker_changed(self, state: BreakerState) -> None:
        """Export the breaker's state."""
        self.circuit_breaker_state.set(BREAKER_VALUES[state])

    def clock_offset(self, offset: Offset) -> None:
        """Export this host's clock offset against the API's."""
        self.api_clock_offset.set(offset.seconds)
        self.api_clock_offset_uncertainty.set(offset.uncertainty)
