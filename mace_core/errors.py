"""Typed errors of the core. The ROS node catches these and answers ``success = false``."""


class MaceError(Exception):
    """Base class of every error the core raises on purpose."""


class InvalidRequestError(MaceError, ValueError):
    """A request that cannot be served as given (NaN, bad sizes, unknown names...)."""


class ModelLoadError(MaceError):
    """A weights file or model registry entry that is missing, corrupt or inconsistent."""
