"""Task state: the lifecycle state machine (spec 2.3)."""
