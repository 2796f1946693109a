"""An example robbench plugin package (see robbench_plugin.py)."""
