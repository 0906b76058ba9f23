"""Typed errors of the core. The ROS node catches these and answers ``success = false``."""


class MaceError(Exception):
    """Base class of every error the core raises on purpose."""


class InvalidRequestError(MaceError, ValueError):
    """A request that cannot be served as given (NaN, bad sizes, unknown names...)."""


class ModelLoadError(MaceError):
    """A weights file or model registry entry that is missing, corrupt or inconsistent."""


#: Characters of an input value that an error message quotes at most.
QUOTE_LIMIT = 100


def quote(value: object, limit: int = QUOTE_LIMIT) -> str:
    """``value`` quoted for a message, cut to ``limit`` characters: ``'abc…' (10000 chars)``.

    Messages and log lines echo what a client sent; this keeps them short whatever it sent.
    """
    text = str(value)
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text)} characters)"


def format_numbers(values, limit: int = 6) -> str:
    """A short list of numbers, ``[0.1, 2, nan]`` (6 significant digits; at most ``limit`` shown,
    then how many more)."""
    try:
        flat = [float(v) for v in _flatten(values)]
    except (TypeError, ValueError):
        return quote(values)
    shown = ", ".join(f"{v:.6g}" for v in flat[:limit])
    more = f", ... ({len(flat)} values)" if len(flat) > limit else ""
    return f"[{shown}{more}]"


def _flatten(values):
    if hasattr(values, "tolist"):
        values = values.tolist()
    if isinstance(values, (list, tuple)):
        for v in values:
            yield from _flatten(v)
    else:
        yield values
