"""Applying a decoded command: start creates a machine; the rest become pending requests.

One function serves the Kafka consumer and the in-process bus of the embedded default.
"""

from __future__ import annotations

import uuid

from worker import decisions
from worker.decisions import Happening
from worker.errors import CommandRejectedError
from worker.messages import Command, CommandName
from worker.records import Machine, Request, check_json
from worker.store import Inbox, Store


def apply_command(store: Store, command: Command, inbox: Inbox | None = None) -> Machine:
    """Record `command` in one transaction with its inbox row. Raises a WorkerError if refused.

    The caller commits the Kafka offset only after this returns or raises a refusal.
    """
    definition = store.registry.get_type(command.machine_type)
    if command.command is CommandName.START:
        if not command.lookup_key:
            raise CommandRejectedError("start needs a lookup_key", reason_code="schema_violation")
        data = command.data or {}
        check_json(data)
        machine_id = command.machine_id or str(uuid.uuid4())
        at = Happening(now=store.db_time(), command_id=command.command_id, actor=command.actor)
        decision = decisions.create(definition, machine_id, command.lookup_key, data, at)
        return store.create_machine(decision, _inbox(command, machine_id, inbox))
    if not command.machine_id:
        raise CommandRejectedError(
            f"{command.command} needs a machine_id", reason_code="schema_violation"
        )
    request = Request(
        command=command.command.value,
        command_id=command.command_id,
        actor=command.actor,
        reason=command.reason,
        target_state=command.target_state,
    )
    return store.record_request(
        definition.name, command.machine_id, request, _inbox(command, command.machine_id, inbox)
    )


def _inbox(command: Command, machine_id: str, given: Inbox | None) -> Inbox:
    return Inbox(
        command_id=command.command_id,
        command=command.command.value,
        machine_type=command.machine_type,
        machine_id=machine_id,
        topic=given.topic if given else None,
        partition=given.partition if given else None,
        offset=given.offset if given else None,
    )
