"""PayMesh's client-side policy chain: deadline, retry, circuit breaker, telemetry.

The core (policy, codes, retry, backoff, budget, breaker, deadline, and the one attempt loop
``attempts`` with its observer ``observe``) has no gRPC import; the adapters (``aio``,
``sync``, ``http``) make one attempt each and classify its outcome. Import the
modules themselves, e.g. ``from interceptors.chain import build_client_chain``.
"""
