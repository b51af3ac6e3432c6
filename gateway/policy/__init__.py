"""Routing policy: schema, loading with validation, and the pure routing decision."""

from gateway.policy.decide import RoutingDecision, decide
from gateway.policy.load import PolicyError, load, parse
from gateway.policy.schema import Policy

__all__ = ["Policy", "PolicyError", "RoutingDecision", "decide", "load", "parse"]
