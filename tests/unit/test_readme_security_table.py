"""The README's who-may-call-what table is the one the topology generates."""

from __future__ import annotations

from pathlib import Path

from services.mesh.authz import markdown_table
from services.mesh.topology import Topology

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_table_of_grants_matches_the_topology() -> None:
    text = README.read_text()
    start, end = "<!-- authz-table:start -->\n", "\n<!-- authz-table:end -->"
    assert start in text and end in text, "README lost its authz-table markers"
    shown = text.split(start, 1)[1].split(end, 1)[0]
    assert shown == markdown_table(Topology(environ={})), (
        "README's table drifted from the topology: paste `python -m services.mesh.authz` between "
        "the authz-table markers"
    )
