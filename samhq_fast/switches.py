"""Environment switches, all read one way: SAMHQ_FAST_DISABLE_FUSED (the fused backend's kill
switch) and SAMHQ_FAST_AUTOTUNE (timing launch configs on first use)."""

import os

OFF_VALUES = ("0", "false", "no", "off")


def env_flag(name: str, default: bool) -> bool:
    """Whether the switch `name` is on: unset or blank -> `default`; "0", "false", "no" or "off" (any
    case, surrounding spaces ignored) -> False; any other value ("1", "true", "yes", ...) -> True."""
    value = os.environ.get(name, "").strip().lower()
    if not value:
        return default
    return value not in OFF_VALUES
