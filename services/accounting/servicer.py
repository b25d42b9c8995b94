"""accounting-service RPCs: validate, then post to or read from the ledger store."""

from __future__ import annotations

from paymesh.accounting.v1 import accounting_pb2, accounting_pb2_grpc
from services.accounting import ledger
from services.accounting.store import LedgerStore
from services.mesh import validation as v
from services.mesh.bootstrap import Context


class AccountingServicer(accounting_pb2_grpc.AccountingServiceServicer):
    """Posts balanced transactions; reports transactions, entries and balances."""

    def __init__(self, store: LedgerStore) -> None:
        self._store = store

    async def PostTransaction(
        self, request: accounting_pb2.PostTransactionRequest, context: Context
    ) -> accounting_pb2.PostTransactionResponse:
        v.require_request_id("request_id", request.request_id)
        ledger.require_transaction_id("transaction_id", request.transaction_id)
        if request.kind == accounting_pb2.TRANSACTION_KIND_UNSPECIFIED or (
            request.kind not in accounting_pb2.TransactionKind.values()
        ):
            raise v.invalid("kind", "must be a concrete TransactionKind")
        if request.reference_id:
            v.require_id("reference_id", request.reference_id)
        v.optional_text("description", request.description)
        ledger.check_postings(request.postings)
        if len(request.non_negative_account_ids) > ledger.MAX_POSTINGS:
            raise v.invalid("non_negative_account_ids", f"at most {ledger.MAX_POSTINGS} accounts")
        for index, account_id in enumerate(request.non_negative_account_ids):
            ledger.require_account_id(f"non_negative_account_ids[{index}]", account_id)
        return accounting_pb2.PostTransactionResponse(transaction=self._store.post(request))

    async def GetTransaction(
        self, request: accounting_pb2.GetTransactionRequest, context: Context
    ) -> accounting_pb2.GetTransactionResponse:
        ledger.require_transaction_id("transaction_id", request.transaction_id)
        return accounting_pb2.GetTransactionResponse(
            transaction=self._store.get(request.transaction_id)
        )

    async def ListEntries(
        self, request: accounting_pb2.ListEntriesRequest, context: Context
    ) -> accounting_pb2.ListEntriesResponse:
        ledger.require_account_id("account_id", request.account_id)
        if request.currency_code:
            v.require_currency("currency_code", request.currency_code)
        size = v.page_size(request.page_size)
        filters = {"account_id": request.account_id, "currency_code": request.currency_code}
        position = v.page_position(request.page_token, filters, {"seq": int})
        found, next_token = v.page_of(
            self._store.entries(
                account_id=request.account_id,
                currency_code=request.currency_code,
                after_seq=position[0] if position is not None else 0,
                limit=size + 1,
            ),
            size,
            filters,
            lambda last: {"seq": last[0]},
        )
        return accounting_pb2.ListEntriesResponse(
            entries=[entry for _, entry in found], next_page_token=next_token
        )

    async def GetBalance(
        self, request: accounting_pb2.GetBalanceRequest, context: Context
    ) -> accounting_pb2.GetBalanceResponse:
        ledger.require_account_id("account_id", request.account_id)
        v.require_currency("currency_code", request.currency_code)
        return accounting_pb2.GetBalanceResponse(
            balance=self._store.balance(request.account_id, request.currency_code)
        )

    async def ListBalances(
        self, request: accounting_pb2.ListBalancesRequest, context: Context
    ) -> accounting_pb2.ListBalancesResponse:
        v.require_id("merchant_id", request.merchant_id)
        size = v.page_size(request.page_size)
        filters = {"merchant_id": request.merchant_id}
        after = v.page_position(request.page_token, filters, {"account": str, "currency": str})
        balances, next_token = v.page_of(
            self._store.merchant_balances(request.merchant_id, after=after, limit=size + 1),
            size,
            filters,
            lambda last: {"account": last.account_id, "currency": last.balance.currency_code},
        )
        return accounting_pb2.ListBalancesResponse(balances=balances, next_page_token=next_token)
