"""The few exceptions p3s raises; callers never see library exceptions."""

from __future__ import annotations


class P3SError(Exception):
    """Base of every error p3s raises on purpose."""


class ConfigError(P3SError):
    """The configuration file or environment holds a bad value."""


class TemplateError(P3SError):
    """A DAG template is malformed; the message names the node, edge or attribute."""


class InvalidMessage(P3SError):
    """A message body is not JSON, lacks a field, or has the wrong schema version."""


class ReportRefused(InvalidMessage):
    """A report that cannot be believed: no or a wrong token, another pilot's job, or the wrong broker account."""

    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(reason)
        self.kind = kind  # token, pilot or account: the label of p3s_reports_refused_total


class BrokerUnavailable(P3SError):
    """The message broker cannot be reached or refused an operation."""


class DatabaseUnavailable(P3SError):
    """The database cannot be reached or its schema is not at the expected revision."""


class DatabaseRefused(DatabaseUnavailable):
    """The database answered and refused the credentials or the database name: waiting cannot help."""


class NotFound(P3SError):
    """A named object (template, node, job) does not exist."""
