"""merchant-auth-service RPCs: issue, authenticate, revoke and list merchant API keys."""

from __future__ import annotations

import asyncio

from interceptors.errors import FailedPrecondition, NotFound, Unauthenticated
from paymesh.merchant.v1 import merchant_pb2
from paymesh.merchant_auth.v1 import merchant_auth_pb2 as pb
from paymesh.merchant_auth.v1 import merchant_auth_pb2_grpc
from services import validation as v
from services.bootstrap import Context
from services.merchant_auth import keys
from services.merchant_auth.merchants import MerchantDirectory
from services.merchant_auth.store import ApiKeyStore

MAX_LABEL_LENGTH = 100


class MerchantAuthServicer(merchant_auth_pb2_grpc.MerchantAuthServiceServicer):
    """Issues keys to active merchants and tells callers whose key a secret is."""

    def __init__(
        self,
        store: ApiKeyStore,
        merchants: MerchantDirectory,
        hasher: keys.ScryptHasher,
        verified: keys.VerifiedSecrets | None = None,
    ) -> None:
        self._store = store
        self._merchants = merchants
        self._hasher = hasher
        self._verified = verified or keys.VerifiedSecrets()

    async def IssueApiKey(
        self, request: pb.IssueApiKeyRequest, context: Context
    ) -> pb.IssueApiKeyResponse:
        v.require_request_id("request_id", request.request_id)
        v.require_id("merchant_id", request.merchant_id)
        v.optional_text("label", request.label, limit=MAX_LABEL_LENGTH)
        # A replay answers from the store alone (same body: the first key's metadata; another
        # body: INVALID_ARGUMENT), whatever the merchant's status is by now.
        if not self._store.issued_by(request.request_id):
            merchant = await self._merchants.lookup(request.merchant_id, allow_stale=False)
            if merchant.status != merchant_pb2.MERCHANT_STATUS_ACTIVE:
                raise FailedPrecondition(
                    f"merchant {request.merchant_id!r} is not active; keys are issued only to "
                    "active merchants",
                    reason="MERCHANT_INACTIVE",
                    metadata={"merchant_id": request.merchant_id},
                )
        key = keys.new_key()
        # scrypt is CPU-bound by design and releases the GIL: keep it off the event loop.
        secret_hash = await asyncio.to_thread(self._hasher.hash, key.secret)
        return self._store.issue(request, key, secret_hash)

    async def AuthenticateApiKey(
        self, request: pb.AuthenticateApiKeyRequest, context: Context
    ) -> pb.AuthenticateApiKeyResponse:
        # Messages never echo the presented secret: it may be a real key with a typo.
        key_id = keys.key_id_of(request.api_key)
        if key_id is None:
            raise Unauthenticated("api_key is not a PayMesh secret key (sk_...)")
        credential = self._store.credential(key_id)
        # The key id is public (it is the displayed prefix), so answering an unknown one
        # faster than a wrong secret reveals nothing an attacker could not read anyway.
        if credential is None or not await self._secret_matches(
            key_id, request.api_key, credential.secret_hash
        ):
            raise Unauthenticated("api_key is not valid", metadata={"key_id": key_id})
        # Revocation is told only to a holder of the real secret.
        if credential.status == pb.API_KEY_STATUS_REVOKED:
            raise Unauthenticated(
                f"API key {key_id} was revoked",
                reason="API_KEY_REVOKED",
                metadata={"key_id": key_id},
            )
        try:
            merchant = await self._merchants.lookup(credential.merchant_id, allow_stale=True)
        except NotFound as exc:
            raise Unauthenticated(
                f"API key {key_id} belongs to a merchant that no longer exists",
                metadata={"key_id": key_id},
            ) from exc
        return pb.AuthenticateApiKeyResponse(
            merchant_id=credential.merchant_id,
            key_id=key_id,
            active=merchant.status == merchant_pb2.MERCHANT_STATUS_ACTIVE,
            webhook_url=merchant.webhook_url,
        )

    async def _secret_matches(self, key_id: str, secret: str, stored_hash: str) -> bool:
        if self._verified.known_good(key_id, secret, stored_hash):
            return True
        if not await asyncio.to_thread(self._hasher.verify, secret, stored_hash):
            return False
        self._verified.remember(key_id, secret, stored_hash)
        return True

    async def RevokeApiKey(
        self, request: pb.RevokeApiKeyRequest, context: Context
    ) -> pb.RevokeApiKeyResponse:
        v.require_request_id("request_id", request.request_id)
        v.require_id("key_id", request.key_id)
        v.optional_text("reason", request.reason)
        return pb.RevokeApiKeyResponse(api_key=self._store.revoke(request))

    async def ListApiKeys(
        self, request: pb.ListApiKeysRequest, context: Context
    ) -> pb.ListApiKeysResponse:
        v.require_id("merchant_id", request.merchant_id)
        size = v.page_size(request.page_size)
        filters = {"merchant_id": request.merchant_id}
        before = v.page_position(request.page_token, filters, v.NANOS_AND_ID)
        api_keys, next_token = v.page_of(
            self._store.list(merchant_id=request.merchant_id, before=before, limit=size + 1),
            size,
            filters,
            lambda last: {"t": last.create_time.ToNanoseconds(), "id": last.key_id},
        )
        return pb.ListApiKeysResponse(api_keys=api_keys, next_page_token=next_token)
