"""The daemon: the ``connserver`` command, signals and drain, workers, listeners, systemd."""
