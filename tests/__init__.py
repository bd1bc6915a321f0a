"""connserver's own test suite, in tiers: unit/, loopback/, hostile/, process/.

A package, so every test module has one name (``tests.loopback.test_server``) whether
pytest collects it or another test imports a helper from it. The tiers are described
in docs/explanation/architecture.md ("Tests in tiers"); shared fixtures are in
conftest.py, the TLS fixtures in tls_support.py.
"""
