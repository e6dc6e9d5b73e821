"""Example machine types shipped for the demo, the tests and the benchmarks.

`smw worker --handlers handlers` loads every MachineType defined at this module's top level.
Add your own module the same way and pass its name to --handlers.
"""

from handlers.onboarding import account_onboarding
from handlers.orders import order_saga

__all__ = ["account_onboarding", "order_saga"]
