"""The web service: pages and a JSON API for shifters and operators (``p3s web``)."""
