"""Engines: registration, heartbeats and the leased event queue."""
