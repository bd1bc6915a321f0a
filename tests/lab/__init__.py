"""Lab tier: ``connserver lab`` end to end, and its handlers under the pytest plugin.

Rules: a lab runs through ``cli.main(["lab", NAME, "--short", "--json"])`` in
this process, so the runner's own threads and sockets fall under the leak
check, while each side runs in a child process the runner always ends; a
short run takes about 3–5 s, so each lab is run once per side selection and
its document checked for everything at once. Handlers are tested in-process
with the plugin's ``connserver_server`` fixture and ``assert_no_leaks``.
"""
