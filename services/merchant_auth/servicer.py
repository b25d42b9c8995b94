"""merchant-auth-service RPCs: issue, authenticate, revoke and list merchant API keys.

AuthenticateApiKey reads the secret from the call's ``authorization: Bearer`` metadata and
asks the verification limits first, so a flood of guesses is refused before it costs work.
"""

from __future__ import annotations

from interceptors.errors import Reason
from paymesh.merchant.v1 import merchant_pb2
from paymesh.merchant_auth.v1 import merchant_auth_pb2 as pb
from paymesh.merchant_auth.v1 import merchant_auth_pb2_grpc
from services.merchant_auth import keys
from services.merchant_auth.limits import VerificationGuard, VerificationLimits, client_peer
from services.merchant_auth.merchants import MerchantDirectory
from services.merchant_auth.shared_limits import SharedVerificationGuard
from services.merchant_auth.store import ApiKeyStore, Credential
from services.merchant_auth.verified import VerifiedKeys
from services.mesh import validation as v
from services.mesh.authz import AUTHORIZATION_KEY, CLIENT_PEER_KEY
from services.mesh.bootstrap import Context
from services.mesh.errors import FailedPrecondition, NotFound, ResourceExhausted, Unauthenticated

MAX_LABEL_LENGTH = 100


class MerchantAuthServicer(merchant_auth_pb2_grpc.MerchantAuthServiceServicer):
    """Issues keys to active merchants and tells callers whose key a secret is."""

    def __init__(
        self,
        store: ApiKeyStore,
        merchants: MerchantDirectory,
        hasher: keys.PepperedHasher,
        *,
        guard: VerificationGuard | None = None,
        verifier: keys.SecretVerifier | None = None,
        shared_guard: SharedVerificationGuard | None = None,
        verified: VerifiedKeys | None = None,
    ) -> None:
        self._store = store
        self._merchants = merchants
        self._hasher = hasher
        self._guard = (
            shared_guard.local if shared_guard else guard or VerificationGuard(VerificationLimits())
        )
        # With REDIS_URL: failures counted across replicas, verified keys shared.
        self._shared_guard = shared_guard
        self._verified = verified
        self._verifier = verifier or keys.KeyVerifier(hasher)

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
                    reason=Reason.MERCHANT_INACTIVE,
                    metadata={"merchant_id": request.merchant_id},
                )
        key = keys.new_key()
        return self._store.issue(request, key, self._hasher.digest(key.secret))

    async def AuthenticateApiKey(
        self, request: pb.AuthenticateApiKeyRequest, context: Context
    ) -> pb.AuthenticateApiKeyResponse:
        # Messages never echo the presented secret: it may be a real key with a typo.
        metadata = tuple(context.invocation_metadata() or ())
        secret = keys.bearer_secret([value for key, value in metadata if key == AUTHORIZATION_KEY])
        if secret is None:
            raise Unauthenticated(
                "AuthenticateApiKey needs the secret key as call metadata"
                f" '{AUTHORIZATION_KEY}: Bearer <secret>'",
                reason=Reason.CREDENTIALS_MISSING,
            )
        forwarded = next(
            (value for key, value in metadata if key == CLIENT_PEER_KEY and isinstance(value, str)),
            None,
        )
        peer = client_peer(forwarded, context.peer())
        key_id = keys.key_id_of(secret)
        await self._refuse_if_limited(peer, key_id)
        if key_id is None:
            await self._failed(peer, None)
            raise Unauthenticated("the bearer token is not a PayMesh secret key (sk_...)")
        credential = None
        if self._verified is not None:
            credential = await self._verified.credential(key_id, secret)
        if credential is None:
            credential = await self._verified_credential(secret, key_id, peer)
        else:
            # Known to this replica now; the replica that verified it told every replica.
            self._guard.succeeded(peer=peer, key_id=key_id)
        # Revocation is told only to a holder of the real secret.
        if credential.status == pb.API_KEY_STATUS_REVOKED:
            raise Unauthenticated(
                f"API key {key_id} was revoked",
                reason=Reason.API_KEY_REVOKED,
                metadata={"key_id": key_id},
            )
        try:
            merchant = await self._merchants.lookup(
                credential.merchant_id, allow_stale=True, allow_cached=True
            )
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

    async def _verified_credential(self, secret: str, key_id: str, peer: str) -> Credential:
        """The key's credential from the store once ``secret`` verified against it."""
        credential = self._store.credential(key_id)
        # The key id is public (it is the displayed prefix), so answering an unknown one
        # faster than a wrong secret reveals nothing an attacker could not read anyway.
        if credential is None:
            await self._failed(peer, None)
            raise Unauthenticated("the API key is not valid", metadata={"key_id": key_id})
        verification = await self._verify(secret, credential)
        if not verification.matches:
            await self._failed(peer, key_id)
            raise Unauthenticated("the API key is not valid", metadata={"key_id": key_id})
        if self._shared_guard is not None:
            await self._shared_guard.succeeded(peer=peer, key_id=key_id)
        else:
            self._guard.succeeded(peer=peer, key_id=key_id)
        if verification.upgraded_hash is not None:
            self._store.replace_hash(
                key_id, old=credential.secret_hash, new=verification.upgraded_hash
            )
        if self._verified is not None:
            await self._verified.remember(credential, secret)
        return credential

    async def _failed(self, peer: str, key_id: str | None) -> None:
        if self._shared_guard is not None:
            await self._shared_guard.failed(peer=peer, key_id=key_id)
        else:
            self._guard.failed(peer=peer, key_id=key_id)

    async def _refuse_if_limited(self, peer: str, key_id: str | None) -> None:
        """RESOURCE_EXHAUSTED TOO_MANY_FAILED_ATTEMPTS if the peer or the key id is locked."""
        if self._shared_guard is not None:
            refusal = await self._shared_guard.refusal(peer=peer, key_id=key_id)
        else:
            refusal = self._guard.refusal(peer=peer, key_id=key_id)
        if refusal is None:
            return
        if refusal.subject == "peer":
            message = f"too many failed API key verifications from {peer}"
            metadata = {"peer": peer}
        else:
            message = f"too many failed verifications of API key {key_id}"
            metadata = {"key_id": str(key_id)}
        raise ResourceExhausted(
            f"{message}; retry in {refusal.retry_after_s:.0f} s",
            reason=Reason.TOO_MANY_FAILED_ATTEMPTS,
            metadata=metadata,
            retry_delay_s=refusal.retry_after_s,
        )

    async def _verify(self, secret: str, credential: Credential) -> keys.Verification:
        """The verifier's answer, if a slot is free; RESOURCE_EXHAUSTED OVERLOADED if not."""
        in_flight = self._guard.in_flight
        if not in_flight.try_start():
            raise ResourceExhausted(
                f"{in_flight.running} API key verifications are in flight already; retry shortly",
                reason=Reason.OVERLOADED,
                retry_delay_s=self._guard.limits.overload_retry_s,
            )
        try:
            return await self._verifier.verify(secret, credential.secret_hash)
        finally:
            in_flight.finish()

    async def RevokeApiKey(
        self, request: pb.RevokeApiKeyRequest, context: Context
    ) -> pb.RevokeApiKeyResponse:
        v.require_request_id("request_id", request.request_id)
        v.require_id("key_id", request.key_id)
        v.optional_text("reason", request.reason)
        api_key = self._store.revoke(request)
        if self._verified is not None:
            await self._verified.forget(request.key_id)
        return pb.RevokeApiKeyResponse(api_key=api_key)

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
