"""Bot extensions, one package per feature (`_cog.py` for Discord I/O, logic beside it)."""
