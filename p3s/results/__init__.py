"""DQM results: the manifest a payload writes, and what p3s records of it.

Payload authors need only :func:`write_manifest` (also ``python -m
p3s.results``); the rest of p3s reads manifests (the pilot), records them and
raises alarms (the dispatcher), and lists them (``p3s results``, the web
service).
"""

from p3s.results.manifest import MANIFEST_NAME, ManifestError, write_manifest

__all__ = ["MANIFEST_NAME", "ManifestError", "write_manifest"]
