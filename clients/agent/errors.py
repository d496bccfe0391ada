"""The agent's errors: what stops it, with a message that says why and what to do."""

from __future__ import annotations


class AgentError(Exception):
    """The agent cannot start or go on; the message says why and what to do."""


class EnrollmentRefused(AgentError):
    """The server refused to enroll this agent (a bad token, a bad request)."""
