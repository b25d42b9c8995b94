"""Start merchant-auth-service: ``python -m services.merchant_auth``."""

import time
from collections.abc import Callable

from paymesh.merchant.v1 import merchant_pb2_grpc
from services.merchant_auth.config import AuthConfig
from services.merchant_auth.keys import KeyVerifier, PepperedHasher, SecretVerifier
from services.merchant_auth.limits import VerificationGuard
from services.merchant_auth.merchants import MerchantDirectory
from services.merchant_auth.pepper import load_pepper
from services.merchant_auth.servicer import MerchantAuthServicer
from services.merchant_auth.shared_limits import SharedVerificationGuard
from services.merchant_auth.store import ApiKeyStore
from services.merchant_auth.verified import VerifiedKeys
from services.mesh.bootstrap import ServiceContext, run
from services.mesh.topology import Target
from services.storage.shared_state import SharedCache

NAME = Target.MERCHANT_AUTH


def build(
    context: ServiceContext,
    *,
    limits_clock: Callable[[], float] = time.monotonic,
    wrap_verifier: Callable[[SecretVerifier], SecretVerifier] | None = None,
) -> list[object]:
    """The servicer over the key store, asking merchant-service about merchants.

    Tests give the verification limits a fake clock (``limits_clock``) and hold verifications
    in flight around the real verifier (``wrap_verifier``).
    """
    config = AuthConfig.from_environ(context.environ)
    hasher = PepperedHasher(load_pepper(config.pepper_file, var_dir=context.var_dir))
    store = ApiKeyStore(context.database_path())
    context.on_stop.append(store.close)
    shared = context.shared_state()
    merchants = MerchantDirectory(
        context.clients.stub(Target.MERCHANT, merchant_pb2_grpc.MerchantServiceStub),
        stale_s=config.merchant_stale_s,
        cache_s=config.merchant_cache_s,
        shared=None if shared is None else SharedCache(shared, NAME, "merchants"),
    )
    verifier: SecretVerifier = KeyVerifier(hasher)
    if wrap_verifier is not None:
        verifier = wrap_verifier(verifier)
    guard = VerificationGuard(config.limits, clock=limits_clock)
    verified = None
    if shared is not None and config.verified_key_cache_s > 0:
        verified = VerifiedKeys(
            SharedCache(shared, NAME, "verified-keys"), hasher, ttl_s=config.verified_key_cache_s
        )
    servicer = MerchantAuthServicer(
        store,
        merchants,
        hasher,
        guard=guard,
        verifier=verifier,
        shared_guard=None
        if shared is None
        else SharedVerificationGuard(guard, shared, service=NAME),
        verified=verified,
    )
    return [servicer]


if __name__ == "__main__":
    run(NAME, build)
