"""Records logged in actor processes reach the logging configuration given to the bus."""
from __future__ import annotations

import logging

import pytest

from actorbus import Envelope
from tests import handlers
from tests.support import read_records, wait_for

pytestmark = pytest.mark.integration


def test_info_lines_of_actors_are_kept_though_this_process_had_info_off(make_bus, records,
                                                                        log_file):
    # This process logs WARNING and up; its loggers cache "INFO is off", and the actor
    # processes forked from it inherit that cache. Their own root is at INFO (log_file's).
    bridge_log = logging.getLogger("actorbus.bridge")
    assert logging.getLogger().getEffectiveLevel() > logging.INFO
    assert not bridge_log.isEnabledFor(logging.INFO)

    bus = make_bus(pool_size=1)
    bus.subscribe("orders.>", handlers.record, durable="orders")
    assert bus.publish_envelope("orders.{aggregate_id}", Envelope.create("a-1", "T", b"1")).ok
    wait_for(lambda: read_records(records), what="the envelope handled")

    # An INFO line of the Bridge's: it was pinned by that first message.
    wait_for(lambda: "INFO actorbus.bridge durable orders: pinned" in log_file.read_text(),
             what="the Bridge's INFO line in the bus's log")
