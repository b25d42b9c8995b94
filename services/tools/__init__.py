"""Tools that run the mesh.

The launcher and its supervisor, ``make status``, the partner sandbox, generated deploy files.
"""
