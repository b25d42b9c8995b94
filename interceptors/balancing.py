"""How a channel spreads calls over a target's replicas: gRPC's own service config, from policy.

Every channel balances with ``round_robin`` over the endpoints its target resolves to, checks
each replica's health (``grpc.health.v1`` Watch: a replica answering NOT_SERVING gets no
calls) and ejects outliers (gRFC A50 failure-percentage ejection). gRPC's own retries stay
off: the chain retries, and with round_robin its next attempt goes to the next replica.
No gRPC import here: :func:`service_config` is the JSON a channel is given.
"""

from __future__ import annotations

import json
from typing import Any

from interceptors.policy import BalancingPolicy


def _duration(seconds: float) -> str:
    """A protobuf Duration in JSON (``"1.500s"``)."""
    return f"{seconds:.3f}s"


def service_config(policy: BalancingPolicy, *, health_service: str = "") -> dict[str, Any]:
    """The gRPC service config of a channel under ``policy``.

    ``health_service`` is the name the replicas' health servicer reports readiness under
    (the served proto service; "" is the whole server).
    """
    outlier = {
        "interval": _duration(policy.outlier_interval_s),
        "baseEjectionTime": _duration(policy.base_ejection_s),
        "maxEjectionTime": _duration(policy.max_ejection_s),
        "maxEjectionPercent": policy.max_ejection_percent,
        "failurePercentageEjection": {
            "threshold": policy.failure_percent,
            "enforcementPercentage": 100,
            "minimumHosts": policy.minimum_hosts,
            "requestVolume": policy.request_volume,
        },
        "childPolicy": [{"round_robin": {}}],
    }
    config: dict[str, Any] = {
        "loadBalancingConfig": [{"outlier_detection_experimental": outlier}],
    }
    if policy.health_check:
        config["healthCheckConfig"] = {"serviceName": health_service}
    return config


def service_config_json(policy: BalancingPolicy, *, health_service: str = "") -> str:
    """:func:`service_config` as the ``grpc.service_config`` channel argument wants it."""
    return json.dumps(service_config(policy, health_service=health_service), sort_keys=True)
