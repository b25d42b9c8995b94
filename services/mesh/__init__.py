"""The runtime every service stands on.

Serving, identity, authorization, client factory, admin, diagnostics, metrics, tracing,
validation and server-side errors.
"""
