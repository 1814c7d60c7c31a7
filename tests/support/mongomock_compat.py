"""mongomock 4.3 with the pymongo this project uses: one shim, for every test and the simulator."""

from __future__ import annotations

from typing import Any

import mongomock

_Bulk = mongomock.collection.BulkOperationBuilder
_add_update = _Bulk.add_update


def _add_update_without_sort(self: object, *args: Any, sort: Any = None, **kwargs: Any) -> Any:
    """pymongo >= 4.11 hands every bulk update a `sort` (None unless asked for), which
    mongomock 4.3 does not accept; the adapter never sorts a bulk update."""
    assert sort is None
    return _add_update(self, *args, **kwargs)


def mongomock_client() -> mongomock.MongoClient:
    """A mongomock client whose bulk writes accept what pymongo hands them."""
    _Bulk.add_update = _add_update_without_sort  # idempotent: always the same shim
    return mongomock.MongoClient()
