"""The pool: the Router, the aggregate actors that run handlers, and the messages between actors."""
