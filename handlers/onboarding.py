"""Account onboarding, written with plain functions: create → verify email → provision.

Uses a global lock on the account so that no other locked machine of any type touches the
account while it is being set up. `"workspace_quota_exceeded": true` fails provisioning for
good, and the compensations delete what was made.
"""

from __future__ import annotations

from typing import Any

from worker import Fail, LockPolicy, MachineType, RetryPolicy, StepContext, step


def create_account(ctx: StepContext) -> dict[str, Any]:
    return {"account_id": f"acct-{ctx.lookup_key}"}


def delete_account(ctx: StepContext) -> dict[str, Any]:
    return {"account_id": None, "account_deleted": True}


def verify_email(ctx: StepContext) -> dict[str, Any]:
    return {"email_verified": True}


def provision_workspace(ctx: StepContext) -> Fail | dict[str, Any]:
    if ctx.data.get("workspace_quota_exceeded"):
        return Fail(error="workspace quota exceeded for this plan")
    return {"workspace": f"ws-{ctx.lookup_key}"}


account_onboarding = MachineType(
    name="account_onboarding",
    steps=(
        step("create_account", create_account, backward=delete_account),
        step("verify_email", verify_email),
        step("provision_workspace", provision_workspace),
    ),
    lock_policy=LockPolicy.GLOBAL,
    retry=RetryPolicy(base_delay=0.5, max_delay=5.0, max_attempts=3),
)
