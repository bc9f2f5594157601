"""The RAEE exit database: per training example, its retrieval key and the layers that get it right.

One directory per database::

    meta.json   backbone, head, key encoder, retriever, dataset, counts, shard records, content hash
    shards/     rows in shards of compact .npy tables, memory-mapped when searched (see store.py)
    index/      the retriever's own files (FAISS index, on-disk inverted lists, or torch keys)

- :mod:`raee.database.parts`    the build: planned in shards, run in parts (one per job), resumed, merged
- :mod:`raee.database.build`    rows of a batch, index and meta.json, append (bounded memory, whatever N)
- :mod:`raee.database.store`    the shard files: writing, compact types, checks, content hash
- :mod:`raee.database.tables`   ShardedTable: memory-mapped rows read as torch tensors
- :mod:`raee.database.exit_db`  ExitDatabase: open one, check it matches a run, swap its retriever
"""

from raee.database.build import (KEEP_KEYS_AUTO_BYTES, append_database, exit_rows, fill_index, resolve_keep_keys,
                                 select_fraction)
from raee.database.exit_db import (COMPATIBILITY_FIELDS, FORMAT_VERSION, ExitDatabase, describe_retriever,
                                   setup_description)
from raee.database.parts import (BuildPlan, build_database, build_identity, build_part, check_parts, merge_parts,
                                 plan_build, staged_plan, staging_dir)
from raee.database.store import ShardMismatch
from raee.database.tables import ShardedTable

__all__ = ["COMPATIBILITY_FIELDS", "FORMAT_VERSION", "KEEP_KEYS_AUTO_BYTES", "BuildPlan", "ExitDatabase",
           "ShardMismatch", "ShardedTable", "append_database", "build_database", "build_identity", "build_part",
           "check_parts", "describe_retriever", "exit_rows", "fill_index", "merge_parts", "plan_build",
           "resolve_keep_keys", "select_fraction", "setup_description", "staged_plan", "staging_dir"]
