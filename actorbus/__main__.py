"""``python -m actorbus``: the ``actorbus`` command."""
from actorbus.cli import main

if __name__ == "__main__":
    main(prog_name="actorbus")
