"""Chaos harness: real `smw worker` processes, real MariaDB and Kafka, and things breaking.

`python -m tests.chaos` (or `make chaos`) starts a fleet of workers on a fresh database and
fresh topics, publishes order-saga-like machines gradually, SIGKILLs workers at random,
restarts MariaDB and the Kafka broker while work is in flight, then checks the invariants
the README guarantees and prints a report. It exits 0 only if every invariant holds.

- `machines`: the `chaos_saga` machine type; each action records its executions.
- `harness`: the run (workers, publisher, killer, service restarts, monitor).
- `report`: reading back what happened and checking the invariants.
"""
