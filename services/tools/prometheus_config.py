"""Prometheus scrape configuration of the mesh, written from the topology's admin addresses.

``python -m services.tools.prometheus_config > deploy/prometheus.yml`` writes the static file for
``make run``; a unit test fails when the file and the topology disagree, so it cannot drift.
Tests call :func:`render` with their own (ephemeral) topology and a shorter interval.
"""

from __future__ import annotations

import sys

from services.mesh.topology import Topology

JOB = "paymesh"
DEFAULT_INTERVAL_S = 5


def render(topology: Topology, *, interval_s: float = DEFAULT_INTERVAL_S) -> str:
    """The YAML text: one job, one static target per service labelled with its name."""
    interval = f"{interval_s:g}s"
    lines = [
        "# Scrapes the admin endpoint (/metrics) of every service of `make run`.",
        "# Generated from services/mesh/topology.py: python -m services.tools.prometheus_config",
        "global:",
        f"  scrape_interval: {interval}",
        f"  evaluation_interval: {interval}",
        "scrape_configs:",
        f"  - job_name: {JOB}",
        "    metrics_path: /metrics",
        "    static_configs:",
    ]
    for spec in topology.services:
        lines += [
            f'      - targets: ["{topology.admin_address(spec.name)}"]',
            "        labels:",
            f"          service: {spec.name}",
        ]
    return "\n".join(lines) + "\n"


def main() -> int:
    """Print the configuration of the topology (environment overrides applied)."""
    sys.stdout.write(render(Topology()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
