"""The exception hierarchy. Every error the worker raises on purpose is a WorkerError.

The docstring of each class is its default message; details travel as attributes so that
callers, logs and the dead-letter reason can use them without parsing text.
"""

from __future__ import annotations


class WorkerError(Exception):
    """The state machine worker failed."""

    reason_code = "error"

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or "").strip())


class DefinitionError(WorkerError):
    """A machine type definition is invalid; fix the definition in code."""

    reason_code = "invalid_definition"


class InvalidTypeNameError(DefinitionError):
    """A machine type name must match ^[a-z][a-z0-9_]{0,47}$."""

    reason_code = "invalid_type_name"

    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__(
            f"machine type name {name!r} is invalid: expected ^[a-z][a-z0-9_]{{0,47}}$ "
            "(lowercase letter first, then lowercase letters, digits or _; at most 48 chars)"
        )


class UnknownMachineTypeError(WorkerError):
    """No machine type with that name is registered."""

    reason_code = "unknown_machine_type"

    def __init__(self, name: str, known: list[str]) -> None:
        self.name = name
        self.known = known
        super().__init__(
            f"unknown machine type {name[:64]!r}; registered types are {sorted(known)}; "
            "load the module that defines it with --handlers"
        )


class InvalidTransitionError(WorkerError):
    """The transition table does not allow this transition."""

    reason_code = "invalid_transition"

    def __init__(self, state: str, event: str, target: str) -> None:
        self.state = state
        self.event = event
        self.target = target
        super().__init__(
            f"invalid transition: event {event!r} cannot move a machine from {state!r} "
            f"to {target!r}"
        )


class CommandRejectedError(WorkerError):
    """The command cannot be applied to the machine in its current state."""

    reason_code = "command_rejected"

    def __init__(self, message: str, reason_code: str = "command_rejected") -> None:
        self.reason_code = reason_code
        super().__init__(message)


class MachineNotFoundError(WorkerError):
    """No machine with that id exists for that type."""

    reason_code = "unknown_machine"

    def __init__(self, machine_type: str, machine_id: str) -> None:
        self.machine_type = machine_type
        self.machine_id = machine_id
        super().__init__(
            f"no {machine_type} machine with id {machine_id[:128]!r}; "
            "check the id with `smw machines list`"
        )


class DuplicateMachineError(WorkerError):
    """A machine with that id already exists."""

    reason_code = "duplicate_machine"

    def __init__(self, machine_type: str, machine_id: str) -> None:
        self.machine_type = machine_type
        self.machine_id = machine_id
        super().__init__(f"a {machine_type} machine with id {machine_id!r} already exists")


class TypeRejectedError(WorkerError):
    """The machine type is under an Immediate Rejection lock; new machines are refused."""

    reason_code = "type_locked"

    def __init__(self, machine_type: str, reason: str | None) -> None:
        self.machine_type = machine_type
        super().__init__(
            f"machine type {machine_type!r} is under an immediate-rejection lock"
            + (f" ({reason})" if reason else "")
            + "; clear it with `smw type-lock clear` or wait for its unlock time"
        )


class NotSerializableError(WorkerError):
    """Machine data must be a JSON object of JSON values."""

    reason_code = "not_serializable"

    def __init__(self, path: str, value_type: str) -> None:
        self.path = path
        super().__init__(
            f"data at {path} has type {value_type}, which JSON cannot hold; "
            "store strings, numbers, booleans, null, lists or objects only"
        )


class DuplicateCommandError(WorkerError):
    """A command with that command_id was already applied; it is not applied again."""

    reason_code = "duplicate_command"

    def __init__(self, command_id: str) -> None:
        self.command_id = command_id
        super().__init__(f"command {command_id[:128]!r} was already applied; ignoring the repeat")


class RequestPendingError(CommandRejectedError):
    """The machine already has a command waiting for its current step to end."""

    def __init__(self, pending: str) -> None:
        super().__init__(
            f"a {pending} command is already waiting for the current step to end; "
            "send this command again once that one has taken effect",
            reason_code="request_pending",
        )


class StaleWriteError(WorkerError):
    """This worker no longer owns the machine; its write changed nothing."""

    reason_code = "stale_write"

    def __init__(self, machine_type: str, machine_id: str, version: int) -> None:
        self.machine_type = machine_type
        self.machine_id = machine_id
        self.version = version
        super().__init__(
            f"{machine_type} machine {machine_id!r} is no longer at version {version}: "
            "another worker took it over after this worker's lease expired; nothing was written"
        )


class StoreUnavailableError(WorkerError):
    """The database could not be reached or the transaction failed; the work will be retried."""

    reason_code = "store_unavailable"
