"""The dispatcher: see p3s/dispatcher/service.py."""
