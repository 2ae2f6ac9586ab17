"""The project's error hierarchy.

Every error a caller can act on is one of these. Messages are safe to log (they
name fields, files and counts, never secrets). Later issues map them to gRPC
status codes in one interceptor (``inkling.serving.errors``).
"""

from __future__ import annotations


class InklingError(Exception):
    """Base class of every error inkling raises on purpose."""


class InvalidInputError(InklingError):
    """The caller supplied something malformed: a file, a flag, a field."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class NotFoundError(InklingError):
    """A named thing (a file, a table, a feature view) does not exist."""


class ConfigurationError(InklingError):
    """The configuration is inconsistent or points at something unusable."""


class DependencyUnavailableError(InklingError):
    """A dependency (Redis, Spark, the Feast registry) could not be reached or started."""


class OverloadedError(InklingError):
    """The service is too far behind to take more work now; the caller should retry later."""

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class PrivacyBudgetExceededError(InklingError):
    """A differentially private release would spend more (ε, δ) than the budget has left."""
