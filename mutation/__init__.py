"""Mutation testing of scx_ref's security-critical modules (``nox -s mutation``; see ``mutation/run.py``)."""
