"""Peers the gateway is measured against, and the fallback origin (each runnable with ``python -m``)."""
