"""Service errors. Doors map them to status codes in one place (``pilotboat.api.errors``)."""


class ServiceError(Exception):
    """Base class: ``message`` is safe to show to the caller."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


class InvalidInput(ServiceError):
    pass


class Unauthenticated(ServiceError):
    pass


class Forbidden(ServiceError):
    pass


class NotFound(ServiceError):
    pass


class Conflict(ServiceError):
    pass


class Unavailable(ServiceError):
    pass


class TooManyRequests(ServiceError):
    def __init__(self, message: str, *, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class DeviceTimeout(ServiceError):
    """A device did not answer in time; ``request_id`` names the request when it is still tracked."""

    def __init__(self, message: str, *, request_id: str | None = None) -> None:
        super().__init__(message)
        self.request_id = request_id
