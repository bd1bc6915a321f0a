"""The core: the server, its connections and handlers, deadlines, cancellation, limits.

Imports only itself, ``connserver.protocols`` and the shared top-level modules
(``errors``, ``config``); never the layers above (broadcast, operations, the
daemon, soak), which attach to it instead (see ``Server.attachments``).
"""
