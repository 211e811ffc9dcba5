"""Autoscaling: how many replicas a model needs, and why."""
