"""The JSON report's top-level fields as docs/loadtest.md documents them: the unit tests
check a built report against them, the integration tests a report written by a real run."""

REPORT_KEYS = {
    "schema", "started_at", "target", "mode", "rate", "concurrency", "connections", "devices",
    "duration_s", "elapsed_s", "timeout_s", "seed", "post_share", "post_bytes", "latency_from",
    "requests", "latency_us", "generator", "status", "errors", "timeline", "enforcement",
}  # fmt: skip
