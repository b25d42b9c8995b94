"""Start merchant-auth-service: ``python -m services.merchant_auth``."""

from paymesh.merchant.v1 import merchant_pb2_grpc
from paymesh.merchant_auth.v1 import merchant_auth_pb2, merchant_auth_pb2_grpc
from services.bootstrap import Registration, ServiceContext, run
from services.merchant_auth.config import AuthConfig
from services.merchant_auth.keys import ScryptHasher
from services.merchant_auth.merchants import MerchantDirectory
from services.merchant_auth.servicer import MerchantAuthServicer
from services.merchant_auth.store import ApiKeyStore

NAME = "merchant-auth-service"


def build(context: ServiceContext) -> list[Registration]:
    """The servicer over the key store, asking merchant-service about merchants."""
    config = AuthConfig.from_environ(context.environ)
    store = ApiKeyStore(context.database_path())
    context.on_stop.append(store.close)
    merchants = MerchantDirectory(
        context.clients.stub("merchant-service", merchant_pb2_grpc.MerchantServiceStub),
        stale_s=config.merchant_stale_s,
    )
    servicer = MerchantAuthServicer(store, merchants, ScryptHasher(n=config.scrypt_n))
    return [
        Registration(
            servicer=servicer,
            add_to_server=merchant_auth_pb2_grpc.add_MerchantAuthServiceServicer_to_server,
            service_name=merchant_auth_pb2.DESCRIPTOR.services_by_name[
                "MerchantAuthService"
            ].full_name,
        )
    ]


if __name__ == "__main__":
    run(NAME, build)
