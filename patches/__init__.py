"""Monkey-patches of third-party code, one module per target and version window.

Nothing is patched on import: each module exposes apply() and revert(). The ledger of
every patch is patches/README.md.
"""
