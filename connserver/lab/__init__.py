"""``connserver lab``: each leak the article warns about, happening and then fixed, in numbers.

A lab runs a **broken** server and a **fixed** one, each in its own process on
127.0.0.1, drives the same bounded load at both, shows their figures side by
side, and judges one figure: the broken side must cross a threshold, the
fixed side must stay under it. The broken sides are demonstrations: they live
here only (``connserver`` does not export them), and each is bounded in
count, time and memory so that a learner's machine is never hurt.

The modules, one concept each:

- :mod:`.spec`: what a lab is (:class:`~.spec.Lab`, :class:`~.spec.Plan`,
  :class:`~.spec.Figure`, :class:`~.spec.Check`, the :class:`~.spec.Side` protocol).
- :mod:`.registry`: the list of lab modules, and finding a lab by name or number.
- :mod:`.sides`: the two kinds of server a side runs on (the stdlib's
  ``ThreadingTCPServer``, bounded; :class:`connserver.Server`).
- :mod:`.child`: a side's process (``python -m connserver.lab.child NAME SIDE PLAN``).
- :mod:`.children`: the runner's end of it: start, ask, always end.
- :mod:`.sampler`: threads, fds and RSS from /proc/PID, the side's own figures.
- :mod:`.driver`: the bounded load (:class:`~.driver.Session`, one per side).
- :mod:`.runner`: one run: baseline, load, settle, end, verdict.
- :mod:`.verdict`, :mod:`.display`, :mod:`.cli`: judging, showing, the command.
- One module per lab: :mod:`.vanished_peer` (1), :mod:`.spawned_threads` (2),
  :mod:`.pinned_buffer` (3), :mod:`.slowloris` (4), :mod:`.cancel_by_close` (5),
  :mod:`.rate_limiter` (6), :mod:`.stalled_reader` (7), :mod:`.soak_verdict` (8).

Adding a lab
------------

1. Write ``connserver/lab/<name>.py`` (``vanished_peer.py`` is the model):

   - the broken side's handler, its docstring starting ``BROKEN ON PURPOSE``,
     with whatever bound keeps it harmless (``max_connections`` of a
     :class:`~.sides.StdlibSide`, a cap on threads or bytes it keeps);
   - the fixed side's handler, the way connserver does it;
   - ``start_side(side, plan) -> Side``, run in the child: return a
     :class:`~.sides.StdlibSide` or :class:`~.sides.ConnserverSide` (or any
     object with ``address``, ``figures()`` and a bounded ``stop()``, and
     optionally ``ports``: its other ports by name, such as an admin
     endpoint). Its ``figures`` callable reports the lab's own ``"side"``
     figures; both sides must report every one (a side that has none reports 0);
   - ``drive(session)``, run in this process once per side, at the same
     time: the load, through the :class:`~.driver.Session` only
     (``session.ticks(rate, limit)`` to pace, ``session.connect(keep=...)``,
     ``session.close(sock)``, ``session.count(key)`` for ``"driver"``
     figures; ``session.ports`` for the side's other ports); it must return
     soon after ``session.running()`` turns false. (A tool with bounds of its
     own may be the load: lab 8's is ``connserver soak``.) A load figure the
     verdict judges counts from 0: the baseline is taken before the load;
   - ``LAB = Lab(...)``: number, name (the CLI's and ``docs/lab/NAME.md``),
     one-line title, a few words per side, the page that explains it (under
     ``docs/explanation/``, or a path under ``docs/``), the figures
     (``threads``, ``fds`` and ``RSS`` come first by themselves), the
     :class:`~.spec.Check` (which figure, and one sentence for each
     outcome), and two :class:`~.spec.Plan`\\ s: ``full`` (ends within about
     30 s: baseline 0.5 s + ``load_timeout`` + ``settle_timeout`` + about a
     second of start and stop) and ``short`` (CI: about 3–5 s), each with the
     threshold its load implies and the lab's own ``params``.

2. Add one line to :data:`.registry.LAB_MODULES`.
3. Write ``docs/lab/<name>.md`` (``literalinclude`` the two handlers from the
   module, the command and the numbers it printed here, the explanation page,
   where the article's code has the bug) and add it to ``docs/lab/index.md``'s
   toctree.
4. Add the lab to ``tests/lab/test_labs.py``'s list: it runs ``--short
   --json`` and checks the verdict.
"""

__all__: list[str] = []
