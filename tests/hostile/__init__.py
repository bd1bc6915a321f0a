"""Hostile-client scenarios: peers that misbehave on purpose, each ending with leak checks."""
