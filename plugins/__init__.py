"""robbench's built-in plugins, loaded through the ``robbench`` entry-point group."""
