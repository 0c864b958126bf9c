"""Distributed mode: the PostgreSQL job queue, `stembot worker`, and the fleet of worker slots."""
