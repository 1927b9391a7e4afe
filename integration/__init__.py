"""Integration tests: a real containerd and a real htpasswd-protected registry on this machine.

A package (not a bare directory) so that its modules are ``integration.*`` and never clash with
``tests/`` modules of the same name, for pytest and for mypy alike.
"""
