"""Webhook signing secrets at rest: sealed, bound to their row, rotated with an overlap."""

from __future__ import annotations

import secrets
import sqlite3
from pathlib import Path

import pytest
from google.protobuf.duration_pb2 import Duration

from paymesh.notification.v1 import notification_pb2 as pb
from services.notification.secret_store import SecretSealer, WebhookSecretStore


class Clock:
    def __init__(self) -> None:
        self.now = 1_767_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def key() -> bytes:
    return secrets.token_bytes(32)


def _store(path: Path, key: bytes, clock: Clock) -> WebhookSecretStore:
    return WebhookSecretStore(path / "n.db", SecretSealer(key), clock=clock)


def _rotation(request_id: str, overlap_s: int = 0) -> pb.RotateWebhookSecretRequest:
    return pb.RotateWebhookSecretRequest(
        request_id=request_id,
        merchant_id="m_1",
        previous_secret_overlap=Duration(seconds=overlap_s),
    )


def test_secret_is_not_stored_in_the_clear(tmp_path: Path, key: bytes, clock: Clock) -> None:
    store = _store(tmp_path, key, clock)
    secret = store.rotate(_rotation("r1"), overlap_s=0).secret
    store.close()
    raw = b"".join(path.read_bytes() for path in tmp_path.iterdir())
    assert secret.encode() not in raw and secret.removeprefix("whsec_").encode() not in raw


def test_replay_stored_for_aip155_has_no_secret(tmp_path: Path, key: bytes, clock: Clock) -> None:
    store = _store(tmp_path, key, clock)
    store.rotate(_rotation("r1"), overlap_s=0)
    store.close()
    with sqlite3.connect(tmp_path / "n.db") as conn:
        [(response,)] = conn.execute(
            "SELECT response FROM idempotency_keys WHERE method = 'RotateWebhookSecret'"
        ).fetchall()
    assert pb.RotateWebhookSecretResponse.FromString(response).secret == ""


def test_another_sealing_key_cannot_open_the_secrets(
    tmp_path: Path, key: bytes, clock: Clock
) -> None:
    _store(tmp_path, key, clock).signing_secrets("m_1")
    with pytest.raises(RuntimeError, match="sealing key"):
        _store(tmp_path, secrets.token_bytes(32), clock).signing_secrets("m_1")


def test_sealed_secret_of_one_merchant_does_not_open_as_another(
    tmp_path: Path, key: bytes, clock: Clock
) -> None:
    store = _store(tmp_path, key, clock)
    store.signing_secrets("m_1")
    store.close()
    with sqlite3.connect(tmp_path / "n.db") as conn:
        conn.execute("UPDATE webhook_secrets SET merchant_id = 'm_2'")
    with pytest.raises(RuntimeError):
        _store(tmp_path, key, clock).signing_secrets("m_2")


def test_first_use_creates_one_secret_and_keeps_it(
    tmp_path: Path, key: bytes, clock: Clock
) -> None:
    store = _store(tmp_path, key, clock)
    first = store.signing_secrets("m_1")
    assert len(first) == 1 and first == store.signing_secrets("m_1")
    assert store.signing_secrets("m_2") != first


def test_previous_secret_signs_until_the_overlap_ends(
    tmp_path: Path, key: bytes, clock: Clock
) -> None:
    store = _store(tmp_path, key, clock)
    old = store.rotate(_rotation("r1"), overlap_s=0).secret
    new = store.rotate(_rotation("r2", 60), overlap_s=60).secret
    assert store.signing_secrets("m_1") == [new, old]
    clock.now += 60
    assert store.signing_secrets("m_1") == [new]


def test_rotating_again_retires_an_overlapping_secret_at_once(
    tmp_path: Path, key: bytes, clock: Clock
) -> None:
    store = _store(tmp_path, key, clock)
    store.rotate(_rotation("r1"), overlap_s=0)
    middle = store.rotate(_rotation("r2", 3600), overlap_s=3600).secret
    newest = store.rotate(_rotation("r3", 3600), overlap_s=3600).secret
    assert store.signing_secrets("m_1") == [newest, middle]
