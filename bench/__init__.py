"""Benchmark of the NATS ⇄ WebSocket bridge beside nats-server's own WebSocket listener.

Entry point: ``python bench/run.py`` (see ``--help``).
"""
