"""DAG templates and scheduling decisions: pure logic, no broker, no database.

The modules, one concept each:

* ``model``: Node, Template and FrozenEnv, the values;
* ``rules``: every rule a template must follow (value coercion, bounds,
  no shell syntax) and TemplateLimits, the ``[templates]`` settings;
* ``graphml``: GraphML in (size, depth and count checked while scanning) and out;
* ``render``: DOT and Mermaid pictures;
* ``placeholders``: ``{input}`` and friends, and their expansion at run time;
* ``engine``: which jobs are ready, which are dropped;
* ``legacy``: the older system's templates, converted (``p3s dag import --legacy``).
"""

from __future__ import annotations

from p3s.dagengine.engine import Plan, can_transition, plan, workflow_state
from p3s.dagengine.graphml import parse_graphml, scan_graphml, to_graphml
from p3s.dagengine.model import FrozenEnv, Node, Template
from p3s.dagengine.placeholders import PLACEHOLDERS, expand, expand_env
from p3s.dagengine.render import to_dot, to_mermaid
from p3s.dagengine.rules import TemplateLimits, check_import, check_shell_syntax

__all__ = [
    "PLACEHOLDERS",
    "FrozenEnv",
    "Node",
    "Plan",
    "Template",
    "TemplateLimits",
    "can_transition",
    "check_import",
    "check_shell_syntax",
    "expand",
    "expand_env",
    "parse_graphml",
    "plan",
    "scan_graphml",
    "to_dot",
    "to_graphml",
    "to_mermaid",
    "workflow_state",
]
