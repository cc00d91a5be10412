"""Live state that survives every patch of handlers.py (no restart, so nothing is lost)."""

visits = 0
