"""``connserver soak``: a mixed hostile load against a running server, and a leak verdict."""
