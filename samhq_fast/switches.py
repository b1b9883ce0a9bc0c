"""Environment switches: SAMHQ_FAST_DISABLE_FUSED (the fused backend's kill switch) and
SAMHQ_FAST_AUTOTUNE (timing launch configs on first use), both read by `env_flag`; and Triton's own
TRITON_INTERPRET, read as Triton reads it (`triton_interpreter_on`)."""

import os

OFF_VALUES = ("0", "false", "no", "off")


def env_flag(name: str, default: bool) -> bool:
    """Whether the switch `name` is on: unset or blank -> `default`; "0", "false", "no" or "off" (any
    case, surrounding spaces ignored) -> False; any other value ("1", "true", "yes", ...) -> True."""
    value = os.environ.get(name, "").strip().lower()
    if not value:
        return default
    return value not in OFF_VALUES


def triton_interpreter_on() -> bool:
    """Whether Triton runs @triton.jit kernels in its CPU interpreter: TRITON_INTERPRET as this Triton
    reads it ("1", "true", "on", "yes" or "y", any case, since triton 3.4's knobs; "1" only before).
    Asking Triton keeps every check in step with what the kernels actually do: a TRITON_INTERPRET=true
    compared with "1" would call the interpreted kernels compiled (then time and graph-capture them)."""
    try:
        from triton import knobs
    except ImportError:  # no triton (the kernels cannot run at all), or one older than 3.4
        return os.environ.get("TRITON_INTERPRET") == "1"
    return bool(knobs.runtime.interpret)
