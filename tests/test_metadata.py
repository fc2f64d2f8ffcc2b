"""The Bridge reads delivery count and stream sequence from the ack subject as nats-py does."""
from __future__ import annotations

import pytest
from nats.aio.msg import Msg

from actorbus.bridge.metadata import delivery_numbers

V1 = "$JS.ACK.ORDERS.orders.3.1234.1200.1700000000000000000.7"
V2 = "$JS.ACK.hub.ACCHASH.ORDERS.orders.2.99.98.1700000000000000000.0.abc123"
V2_NO_TOKEN = "$JS.ACK._.ACCHASH.ORDERS.orders.5.12.11.1700000000000000000.0"


@pytest.mark.parametrize("reply", [V1, V2, V2_NO_TOKEN])
def test_delivery_numbers_agree_with_nats_py(reply):
    meta = Msg(None, subject="orders.x", reply=reply).metadata
    assert delivery_numbers(reply) == (meta.num_delivered, meta.sequence.stream)


@pytest.mark.parametrize("reply", [None, "", "_INBOX.abc", "$JS.ACK.too.short", "$JS.API.X.a.1.2.3.4.5"])
def test_a_subject_that_is_no_ack_subject_is_named(reply):
    with pytest.raises(ValueError, match="not a JetStream ack subject"):
        delivery_numbers(reply)
