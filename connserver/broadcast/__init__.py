"""Broadcast: the Hub (one writer thread per hub) and byte-bounded queues."""
