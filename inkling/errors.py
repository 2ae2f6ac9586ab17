"""The project's error hierarchy.

Every error a caller can act on is one of these. Messages are safe to log (they
name fields, files and counts, never secrets). Later issues map them to gRPC
status codes in one interceptor.
"""

from __future__ import annotations


class InklingError(Exception):
    """Base class of every error inkling raises on purpose."""


class InvalidInputError(InklingError):
    """The caller supplied something malformed: a file, a flag, a field."""


class NotFoundError(InklingError):
    """A named thing (a file, a table, a feature view) does not exist."""


class ConfigurationError(InklingError):
    """The configuration is inconsistent or points at something unusable."""


class DependencyUnavailableError(InklingError):
    """A dependency (Redis, Spark, the Feast registry) could not be reached or started."""
