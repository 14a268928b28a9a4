"""DQM results: the manifest a payload writes, and what p3s records of it.

Payload authors need only :func:`write_manifest` (also ``python -m
p3s.results``); the rest of p3s reads manifests (the pilot), records them and
raises alarms (the dispatcher), and lists them (``p3s results``, the web
service).
"""

from typing import Any

__all__ = ["MANIFEST_NAME", "ManifestError", "write_manifest"]


def __getattr__(name: str) -> Any:
    # Loaded on first use: every command checks the [results] run patterns (p3s.results.runs) when it
    # reads its settings, and a listing has no use for the manifest's module and what it imports.
    if name in __all__:
        from p3s.results import manifest

        return getattr(manifest, name)
    raise AttributeError(f"module 'p3s.results' has no attribute {name!r}")
