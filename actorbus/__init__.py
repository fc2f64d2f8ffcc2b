"""actorbus: NATS JetStream events processed on a supervised pool of Thespian actors.

Per-key order, ack only after processing, envelope failures redelivered,
plain failures not.
"""
import logging

from actorbus.aggregate import Aggregate
from actorbus.envelope import Envelope, InvalidEnvelope
from actorbus.bridge.extraction import extract_aggregate_id
from actorbus.bus import BusError, EventBus
from actorbus.config import NatsAuth
from actorbus.errors import ConfigurationError
from actorbus.message import Message
from actorbus.publisher import PublishError, PublishResult
from actorbus.topology import Subscription, Topology

# A library adds no handlers of its own; the application decides where logs go.
logging.getLogger("actorbus").addHandler(logging.NullHandler())

__all__ = [
           "Aggregate",
           "BusError",
           "ConfigurationError",
           "Envelope",
           "EventBus",
           "InvalidEnvelope",
           "Message",
           "NatsAuth",
           "PublishError",
           "PublishResult",
           "Subscription",
           "Topology",
           "extract_aggregate_id",
]
__version__ = "0.1.0"
