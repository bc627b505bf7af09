"""Sending a stage's outputs to Kafka without waiting out the producer's linger."""

from __future__ import annotations

from typing import Any

__all__ = ["send_now"]


def send_now(producer: Any) -> None:
    """An aiokafka producer sends the records it has gathered at once instead of after its linger.

    The linger lets records sent close together share a produce request; a stage calls this once it has
    sent a whole batch's outputs, so a lone record does not wait the linger at every hop. This is what
    aiokafka's own flush_for_commit does before it waits: close the open batches (a closed batch is ready
    to send) and wake the sender. A record sent afterwards goes into a new batch."""
    accumulator = producer._message_accumulator
    for batches in accumulator._batches.values():
        for batch in batches:
            batch._builder.close()
    if not accumulator._waiter_future.done():
        accumulator._waiter_future.set_result(None)
