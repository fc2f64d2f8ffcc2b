"""What a JetStream message's ack subject says about its delivery, read cheaply.

nats-py's ``msg.metadata`` builds a dataclass with a parsed timestamp for
every message; the Bridge needs two numbers from the same subject.
"""
from __future__ import annotations

_V1_TOKENS = 9    # $JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>
_V2_MIN_TOKENS = 11  # $JS.ACK.<domain>.<account>.<stream>.<consumer>.<delivered>.<sseq>...


def delivery_numbers(reply: str | None) -> tuple[int, int]:
    """``(delivery count, stream sequence)`` from a JetStream ack subject.

    Raises ``ValueError`` naming the subject when it is not one.
    """
    tokens = (reply or "").split(".")
    if len(tokens) >= 2 and tokens[0] == "$JS" and tokens[1] == "ACK":
        if len(tokens) == _V1_TOKENS:
            return int(tokens[4]), int(tokens[5])
        if len(tokens) >= _V2_MIN_TOKENS:
            return int(tokens[6]), int(tokens[7])
    raise ValueError(f"not a JetStream ack subject: {reply!r}")


def consumer_of(reply: str | None) -> str | None:
    """The consumer's name in a JetStream ack subject, or None when it is not one."""
    tokens = (reply or "").split(".")
    if len(tokens) < _V1_TOKENS or tokens[0] != "$JS" or tokens[1] != "ACK":
        return None
    return tokens[3] if len(tokens) == _V1_TOKENS else tokens[5]
