"""Where a webhook may go: URLs and resolved addresses by environment (SSRF defence)."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

import pytest

from services.notification import delivery
from services.notification.delivery import (
    PARSED_URLS_KEPT,
    DestinationPolicy,
    PinnedResolver,
    RefusedDestination,
    Resolver,
    parse,
    played_by_sandbox,
    quoted,
    resolve,
)

DEV = DestinationPolicy()
PROD = DestinationPolicy(production=True)


def _resolver(*addresses: str) -> Resolver:
    """DNS that answers ``addresses`` for every name."""

    async def answer(host: str, port: int) -> Sequence[str]:
        return addresses

    return answer


@pytest.mark.parametrize(
    "url",
    [
        "https://merchant.example/hooks",
        "https://hooks.merchant.test:8443/paymesh?tenant=7",
        "https://93.184.215.14/hooks",
        "https://[2606:2800:220:1:248:1893:25c8:1946]/hooks",
    ],
)
def test_public_https_urls_pass_everywhere(url: str) -> None:
    parse(url, DEV)
    parse(url, PROD)


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8080/hooks",
        "http://localhost/hooks",
        "http://[::1]:9000/hooks",
        "https://10.0.0.7/hooks",
        "https://192.168.1.10/hooks",
    ],
)
def test_loopback_http_and_private_addresses_pass_in_development_only(url: str) -> None:
    parse(url, DEV)
    with pytest.raises(RefusedDestination, match="production"):
        parse(url, PROD)


@pytest.mark.parametrize(
    "url",
    [
        "https://169.254.169.254/latest/meta-data/",
        "http://169.254.169.254/",
        "https://169.254.0.1/",
        "https://[fe80::1]/",
        "https://[fe80::1%25eth0]/",
        "https://[::ffff:169.254.169.254]/",
        "https://[2002:a9fe:a9fe::]/",
        "https://[64:ff9b::a9fe:a9fe]/",
        "https://[fd00:ec2::254]/",
        "https://100.100.100.200/",
        "https://168.63.129.16/",
        "https://metadata.google.internal/computeMetadata/v1/",
        "https://METADATA.google.internal./",
        "https://0.0.0.0/",
        "https://[::]/",
        "https://224.0.0.1/",
        "https://255.255.255.255/",
        "https://240.0.0.1/",
    ],
)
def test_link_local_metadata_and_non_unicast_addresses_are_refused_everywhere(url: str) -> None:
    for policy in (DEV, PROD):
        with pytest.raises(RefusedDestination):
            parse(url, policy)


@pytest.mark.parametrize(
    "url",
    [
        "ftp://merchant.example/",
        "https://",
        "merchant.example/hooks",
        "https://user:pw@merchant.example/",
        "https://merchant.example/a b",
        "https://merchant.example/\r\nX-Injected: 1",
        "https://merchant.example\\@169.254.169.254/",
        "http://10.0.0.7/hooks",
        "https://merchant.example:99999/",
        "https://" + "a" * 2100 + ".example/",
    ],
)
def test_malformed_or_plain_http_to_a_remote_address_is_refused(url: str) -> None:
    with pytest.raises(RefusedDestination):
        parse(url, DEV)


def test_a_remembered_check_answers_per_policy_and_refusals_are_checked_again() -> None:
    url = "http://127.0.0.1:8080/hooks"
    assert parse(url, DEV) == parse(url, DEV)  # the second answer is the remembered one
    for _ in range(2):  # accepted in development does not carry over to production
        with pytest.raises(RefusedDestination, match="https in production"):
            parse(url, PROD)
    too_long = "https://merchant.example/" + "a" * 3000
    for _ in range(2):
        with pytest.raises(RefusedDestination, match="longer than"):
            parse(too_long, DEV)


def test_remembered_checks_are_bounded() -> None:
    for i in range(PARSED_URLS_KEPT + 10):
        parse(f"https://merchant{i}.example/hooks", DEV)
    assert delivery._parse.cache_info().currsize <= PARSED_URLS_KEPT


def test_message_quotes_a_short_prefix_without_credentials() -> None:
    assert quoted("https://user:hunter2@merchant.example/x") == "'https://merchant.example/x'"
    shown = quoted("https://merchant.example/" + "a" * 100 + "?token=secret")
    assert "token" not in shown and shown.endswith("...'")


async def test_every_resolved_address_must_pass() -> None:
    destination = parse("https://mixed.merchant.test/hooks", PROD)
    with pytest.raises(RefusedDestination, match="non-public"):
        await resolve(destination, PROD, _resolver("93.184.215.14", "10.0.0.7"))
    assert [str(a) for a in await resolve(destination, PROD, _resolver("93.184.215.14"))] == [
        "93.184.215.14"
    ]


@pytest.mark.parametrize(
    "address", ["10.0.0.7", "127.0.0.1", "::1", "100.64.0.1", "fd12::1", "::ffff:10.0.0.7"]
)
async def test_a_name_resolving_to_a_non_public_address_is_refused_in_production(
    address: str,
) -> None:
    destination = parse("https://hooks.merchant.test/", PROD)
    with pytest.raises(RefusedDestination, match="production"):
        await resolve(destination, PROD, _resolver(address))


async def test_a_name_resolving_to_link_local_is_refused_in_development() -> None:
    destination = parse("https://hooks.merchant.test/", DEV)
    with pytest.raises(RefusedDestination, match="link-local"):
        await resolve(destination, DEV, _resolver("169.254.10.20"))


async def test_plain_http_name_must_resolve_to_loopback_only() -> None:
    destination = parse("http://hooks.merchant.test:8080/", DEV)
    assert [str(a) for a in await resolve(destination, DEV, _resolver("127.0.0.1"))] == [
        "127.0.0.1"
    ]
    with pytest.raises(RefusedDestination, match="loopback"):
        await resolve(destination, DEV, _resolver("127.0.0.1", "192.168.1.10"))


async def test_literal_address_is_not_resolved() -> None:
    async def no_dns(host: str, port: int) -> Sequence[str]:
        raise AssertionError("a literal address needs no lookup")

    destination = parse("https://93.184.215.14/", PROD)
    assert [str(a) for a in await resolve(destination, PROD, no_dns)] == ["93.184.215.14"]


def test_sandbox_plays_example_merchants_in_development_only() -> None:
    destination = parse("https://shop.merchant.example/hooks", DEV)
    assert played_by_sandbox(destination, DEV)
    assert not played_by_sandbox(destination, PROD)
    assert not played_by_sandbox(parse("https://example.com/", DEV), DEV)


async def test_a_pools_resolver_answers_its_own_host_with_its_checked_addresses_only() -> None:
    checked = [ipaddress.ip_address("203.0.113.7"), ipaddress.ip_address("2001:db8::7")]
    pinned = PinnedResolver("hooks.test", 443, checked)
    answer = await pinned.resolve("hooks.test", 443)
    assert [(a["host"], a["port"]) for a in answer] == [("203.0.113.7", 443), ("2001:db8::7", 443)]
    for host, port in (("other.test", 443), ("hooks.test", 80)):
        with pytest.raises(OSError, match="no checked address"):
            await pinned.resolve(host, port)
