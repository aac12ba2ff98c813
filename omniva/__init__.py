"""Omniva: durable, prioritized AI content pipelines on Django and PostgreSQL."""

__version__ = "0.1.0"
