"""Logging (and later metrics and tracing) for ASAP agents."""
