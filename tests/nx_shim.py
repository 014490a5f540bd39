"""nx-27017 as the tests run it, with one fix to the SQLite layer under it.

neosqlite (1.17.2, the newest release) keeps a document's ``_id`` in a column
of its own, and says so for single-key indexes, but builds a compound index's
``_id`` key as ``json_extract(data, '_id')``: a malformed JSON path, so every
insert into a collection with such an index fails ("JSON path error near
'_id'"). rtserver's MongoDB indexes end in ``_id`` (pages are read in id
order). Here that key becomes ``'$._id'``, which is NULL inside ``data``: the
index is accepted and serves nothing, as nx-27017 already ignores index
direction and partial filters. A real MongoDB needs none of this; what the
indexes do there is checked by the real-MongoDB layer's ``explain`` tests.

    python tests/nx_shim.py <nx-27017 arguments>
"""

from __future__ import annotations

import runpy

from neosqlite.collection import index_manager

_parse_json_path = index_manager.parse_json_path


def parse_json_path(field: str) -> str:
    return "$._id" if field == "_id" else _parse_json_path(field)


if __name__ == "__main__":
    index_manager.parse_json_path = parse_json_path
    runpy.run_module("nx_27017.nx_27017", run_name="__main__")
