"""The partner client on aiohttp: one keep-alive pool per partner, bounded answers, closed pools."""

from __future__ import annotations

import grpc
import pytest

from interceptors.chain import build_client_chain
from interceptors.errors import PartnerCallError
from interceptors.http import PartnerClient
from interceptors.policy import PolicyConfig
from services.mesh.clients import ClientFactory
from services.mesh.topology import Partner, Topology
from tests.integration.harness import eventually, make_chain
from tests.integration.http_partner import Answer, scripted_partner

PARTNER = Partner.EXCHANGE_RATE
LIMIT = 64


async def test_requests_to_a_partner_reuse_one_kept_alive_connection() -> None:
    async with scripted_partner() as partner:
        client = make_chain().http_client(PARTNER, partner.url)
        try:
            for _ in range(3):
                assert (await client.request("GET", "/rates")).status == 200
        finally:
            await client.aclose()
    assert len(partner.seen) == 3
    assert len({seen.client_port for seen in partner.seen}) == 1


async def test_a_cookie_a_partner_sets_is_not_sent_back_on_later_requests() -> None:
    async with scripted_partner() as partner:
        partner.default = Answer(
            body=b"{}",
            headers=(("Content-Type", "application/json"), ("Set-Cookie", "session=merchant-a")),
        )
        # By name: a client's default cookie jar keeps no cookies of bare IP addresses.
        by_name = partner.url.replace("127.0.0.1", "localhost")
        client = make_chain().http_client(PARTNER, by_name)
        try:
            for _ in range(2):
                assert (await client.request("GET", "/rates")).status == 200
        finally:
            await client.aclose()
    assert len(partner.seen) == 2
    assert "Cookie" not in partner.seen[1].headers


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_an_answer_over_the_size_limit_fails_once_with_a_clear_error(chunked: bool) -> None:
    async with scripted_partner() as partner:
        partner.default = Answer(body=b"x" * (LIMIT * 4), chunked=chunked)
        client = PartnerClient(make_chain().runtime, PARTNER, partner.url, max_response_bytes=LIMIT)
        try:
            with pytest.raises(PartnerCallError) as caught:
                await client.request("GET", "/rates")
        finally:
            await client.aclose()
    error = caught.value
    assert (error.code(), error.attempts, error.stop_reason) == (
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        1,
        "not_retryable",
    )
    assert f"exceeds the {LIMIT}-byte limit" in (error.details() or "")
    assert partner.count() == 1


async def test_an_answer_within_the_limit_is_read_whole() -> None:
    async with scripted_partner() as partner:
        partner.default = Answer(body=b'{"pad": "' + b"x" * (LIMIT - 12) + b'"}', chunked=True)
        client = PartnerClient(make_chain().runtime, PARTNER, partner.url, max_response_bytes=LIMIT)
        try:
            status, body = await client.request("GET", "/rates")
        finally:
            await client.aclose()
    assert (status, len(body["pad"])) == (200, LIMIT - 12)


async def test_closing_the_client_factory_closes_the_partner_pools() -> None:
    async with scripted_partner() as partner:
        topology = Topology(environ={"EXCHANGE_RATE_PARTNER_URL": partner.url})
        chain = build_client_chain(caller="channel-adapter", config=PolicyConfig())
        clients = ClientFactory(caller="channel-adapter", topology=topology, chain=chain)
        client = clients.partner(PARTNER)  # held, as a servicer holds it
        assert (await client.request("GET", "/rates")).status == 200
        assert partner.open_connections() == 1  # kept alive for the next call
        await clients.close()
        await eventually(lambda: partner.open_connections() == 0, within_s=2.0)
