"""The order saga: validate → reserve inventory → charge payment → ship → notify.

Class-based steps with compensations. The order's data scripts the unusual paths, so the
demo, the tests and the benchmarks can ask for them:

- `"payment_failures": n`  charge_payment raises n times before it succeeds (retry path);
- `"address_invalid": true` ship_order asks for a rollback (compensation path);
- `"fraud_review": true`    validate_order parks the machine for an operator.
"""

from __future__ import annotations

from typing import Any

from worker import (
    LockPolicy,
    MachineType,
    Park,
    RetryPolicy,
    Rollback,
    Step,
    StepContext,
)


class ValidateOrder(Step):
    name = "validate_order"

    def forward(self, ctx: StepContext) -> Park | dict[str, Any]:
        if ctx.data.get("fraud_review"):
            return Park(reason="order flagged for fraud review")
        return {"validated": True}


class ReserveInventory(Step):
    name = "reserve_inventory"

    def forward(self, ctx: StepContext) -> dict[str, Any]:
        return {"reservation_id": f"res-{ctx.machine_id}"}

    def backward(self, ctx: StepContext) -> dict[str, Any]:
        ctx.log.info("inventory.released", reservation_id=ctx.data.get("reservation_id"))
        return {"reservation_id": None, "inventory_released": True}


class ChargePayment(Step):
    name = "charge_payment"

    def forward(self, ctx: StepContext) -> dict[str, Any]:
        if ctx.attempt <= int(ctx.data.get("payment_failures", 0)):
            raise ConnectionError(f"payment gateway timed out (attempt {ctx.attempt})")
        return {"charge_id": f"ch-{ctx.idempotency_key}", "charged": ctx.data.get("amount", 0)}

    def backward(self, ctx: StepContext) -> dict[str, Any]:
        return {"refunded": ctx.data.get("charged", 0), "charge_id": None}


class ShipOrder(Step):
    name = "ship_order"

    def forward(self, ctx: StepContext) -> Rollback | dict[str, Any]:
        if ctx.data.get("address_invalid"):
            return Rollback(reason="shipping address rejected by carrier")
        return {"tracking_number": f"trk-{ctx.machine_id}"}

    def backward(self, ctx: StepContext) -> dict[str, Any]:
        return {"tracking_number": None, "shipment_cancelled": True}


class NotifyCustomer(Step):
    name = "notify_customer"

    def forward(self, ctx: StepContext) -> dict[str, Any]:
        return {"notified": True}


order_saga = MachineType(
    name="order_saga",
    steps=(ValidateOrder(), ReserveInventory(), ChargePayment(), ShipOrder(), NotifyCustomer()),
    lock_policy=LockPolicy.LOCAL,
    retry=RetryPolicy(base_delay=0.2, max_delay=2.0, max_attempts=4, jitter=0.1),
    event_topic="orders.events",
)
