"""The mesh console: one live page of the running mesh (graph, breaker tiles, restarts, errors).

``python -m services.tools.console`` serves it; ``make run`` starts it with the mesh.
"""
