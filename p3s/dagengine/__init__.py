"""DAG templates and scheduling decisions: pure logic, no broker, no database."""

from __future__ import annotations

from p3s.dagengine.engine import Plan, can_transition, plan, workflow_state
from p3s.dagengine.template import (
    PLACEHOLDERS,
    FrozenEnv,
    Node,
    Template,
    expand,
    expand_env,
    parse_graphml,
    to_dot,
    to_graphml,
    to_mermaid,
)

__all__ = [
    "PLACEHOLDERS",
    "FrozenEnv",
    "Node",
    "Plan",
    "Template",
    "can_transition",
    "expand",
    "expand_env",
    "parse_graphml",
    "plan",
    "to_dot",
    "to_graphml",
    "to_mermaid",
    "workflow_state",
]
