"""Routing: the replica-ranking policies, shared by the live router and the simulator."""
