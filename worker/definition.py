"""Declaring machine types: steps, their actions, and the policies a type runs under."""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from worker.errors import DefinitionError, InvalidTypeNameError, UnknownMachineTypeError
from worker.retry import RetryPolicy

if TYPE_CHECKING:
    from structlog.typing import FilteringBoundLogger

    from worker.outcomes import Outcome
    from worker.records import HistoryEntry

TYPE_NAME = re.compile(r"[a-z][a-z0-9_]{0,47}")
STEP_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]{0,99}")
TOPIC_NAME = re.compile(r"[A-Za-z0-9._\-]{1,249}")


class LockPolicy(StrEnum):
    NONE = "none"
    LOCAL = "local"
    GLOBAL = "global"
    BOTH = "both"

    @property
    def uses_local(self) -> bool:
        return self in (LockPolicy.LOCAL, LockPolicy.BOTH)

    @property
    def uses_global(self) -> bool:
        return self in (LockPolicy.GLOBAL, LockPolicy.BOTH)


class Direction(StrEnum):
    FORWARD = "forward"
    BACKWARD = "backward"


@dataclass(frozen=True)
class StepContext:
    """What a step action sees. `data` is a private copy; return changes as an outcome."""

    machine_id: str
    machine_type: str
    lookup_key: str
    step: str
    step_index: int
    direction: Direction
    data: dict[str, Any]
    attempt: int
    idempotency_key: str
    log: FilteringBoundLogger
    load_history: Callable[[], tuple[HistoryEntry, ...]] = field(repr=False)

    @property
    def history(self) -> tuple[HistoryEntry, ...]:
        """The machine's transitions so far, oldest first (read from the store on first use)."""
        return self.load_history()


class Step:
    """A step handler. Subclass it and override the actions you need.

    `forward` does the work; `backward` compensates it during a rollback; `pause` and `resume`
    run when the machine is paused after this step and resumed again. Actions return None
    (success), a dict (success with data changes) or an outcome from `worker.outcomes`.
    """

    name: str = ""

    def forward(self, ctx: StepContext) -> Outcome | dict[str, Any] | None:
        del ctx
        return None

    def backward(self, ctx: StepContext) -> Outcome | dict[str, Any] | None:
        del ctx
        return None

    def pause(self, ctx: StepContext) -> None:
        del ctx

    def resume(self, ctx: StepContext) -> None:
        del ctx


Action = Callable[[StepContext], "Outcome | dict[str, Any] | None"]
Hook = Callable[[StepContext], None]


class FunctionStep(Step):
    """A step made of plain functions; see `step()`."""

    def __init__(
        self,
        name: str,
        forward: Action,
        backward: Action | None = None,
        pause: Hook | None = None,
        resume: Hook | None = None,
    ) -> None:
        self.name = name
        self._forward = forward
        self._backward = backward
        self._pause = pause
        self._resume = resume

    def forward(self, ctx: StepContext) -> Outcome | dict[str, Any] | None:
        return self._forward(ctx)

    def backward(self, ctx: StepContext) -> Outcome | dict[str, Any] | None:
        return self._backward(ctx) if self._backward else None

    def pause(self, ctx: StepContext) -> None:
        if self._pause:
            self._pause(ctx)

    def resume(self, ctx: StepContext) -> None:
        if self._resume:
            self._resume(ctx)


def step(
    name: str,
    forward: Action,
    backward: Action | None = None,
    pause: Hook | None = None,
    resume: Hook | None = None,
) -> Step:
    """Build a step from functions: `step("charge", charge, backward=refund)`."""
    return FunctionStep(name, forward, backward, pause, resume)


@dataclass(frozen=True)
class MachineType:
    """A named, ordered list of steps and the policies its machines run under."""

    name: str
    steps: tuple[Step, ...]
    lock_policy: LockPolicy = LockPolicy.NONE
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    save_after_each_step: bool = True
    execute_synchronously: bool = True
    event_topic: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not TYPE_NAME.fullmatch(self.name):
            raise InvalidTypeNameError(str(self.name))
        object.__setattr__(self, "steps", tuple(self.steps))
        if not self.steps:
            raise DefinitionError(f"machine type {self.name!r} needs at least one step")
        names = [s.name for s in self.steps]
        for step_name in names:
            if not isinstance(step_name, str) or not STEP_NAME.fullmatch(step_name):
                raise DefinitionError(
                    f"machine type {self.name!r}: step name {step_name!r} is invalid; "
                    "use letters, digits, _, . or - (at most 100 chars)"
                )
        if len(set(names)) != len(names):
            raise DefinitionError(f"machine type {self.name!r}: step names repeat: {names}")
        if self.event_topic is not None and not TOPIC_NAME.fullmatch(self.event_topic):
            raise DefinitionError(
                f"machine type {self.name!r}: event topic {self.event_topic!r} is not a valid "
                "Kafka topic name"
            )
        object.__setattr__(self, "lock_policy", LockPolicy(self.lock_policy))

    @property
    def step_names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.steps)

    @property
    def fingerprint(self) -> str:
        """The ordered step names; stored with each machine to detect definition changes."""
        return ",".join(self.step_names)


def fingerprint_compatible(stored: str, current: str, position: int) -> bool:
    """True when the steps up to and including `position` are the same, in the same order.

    Steps added after the machine's position are compatible; removing or reordering steps
    at or before it is not, because the machine would then run or compensate the wrong step.
    """
    if stored == current:
        return True
    stored_steps = stored.split(",")
    current_steps = current.split(",")
    upto = min(position + 1, len(stored_steps))
    return stored_steps[:upto] == current_steps[:upto] and position < len(current_steps)


class Registry(Mapping[str, MachineType]):
    """The machine types a worker knows, by name. Build one per process; it is not global."""

    def __init__(self, types: Iterable[MachineType] = ()) -> None:
        self._types: dict[str, MachineType] = {}
        for machine_type in types:
            self.add(machine_type)

    def add(self, machine_type: MachineType) -> None:
        existing = self._types.get(machine_type.name)
        if existing is not None and existing is not machine_type:
            raise DefinitionError(f"machine type {machine_type.name!r} is defined twice")
        self._types[machine_type.name] = machine_type

    def get_type(self, name: str) -> MachineType:
        try:
            return self._types[name]
        except KeyError:
            raise UnknownMachineTypeError(name, list(self._types)) from None

    def __getitem__(self, name: str) -> MachineType:
        return self._types[name]

    def __iter__(self) -> Any:
        return iter(self._types)

    def __len__(self) -> int:
        return len(self._types)

    @classmethod
    def from_modules(cls, module_names: Iterable[str]) -> Registry:
        """Import each module and register every MachineType defined at its top level."""
        registry = cls()
        for module_name in module_names:
            name = module_name.strip()
            if not name:
                continue
            try:
                module = importlib.import_module(name)
            except ImportError as exc:
                raise DefinitionError(
                    f"cannot import handler module {name!r}: {exc}; check --handlers and "
                    "that the module is on PYTHONPATH"
                ) from exc
            found = [v for v in vars(module).values() if isinstance(v, MachineType)]
            if not found:
                raise DefinitionError(
                    f"handler module {name!r} defines no MachineType at its top level"
                )
            for machine_type in found:
                registry.add(machine_type)
        return registry
