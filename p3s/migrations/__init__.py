"""Alembic migrations of the p3s schema (run by `p3s db upgrade`)."""
