"""The pilot: see p3s/pilot/service.py."""
