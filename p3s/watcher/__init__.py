"""The watcher: see p3s/watcher/service.py."""
