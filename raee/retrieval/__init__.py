"""Retrievers for RAEE (nearest-neighbour search over the exit database's keys).

- :class:`TorchExactRetriever` exact torch matmul + top-k, any device, no FAISS needed
- :class:`FaissRetriever`      any FAISS index_factory string (Flat, HNSW32, IVFauto,Flat, HNSW32_PQ64, ...)

Add one: subclass :class:`Retriever`, add conf/retriever/<name>.yaml with its ``_target_``.
FAISS is imported only when a FaissRetriever is used.
"""

from raee.retrieval.base import Retriever, clamp_k, to_distances
from raee.retrieval.faiss_index import FaissRetriever, auto_nlist, resolve_factory
from raee.retrieval.torch_exact import TorchExactRetriever

__all__ = ["Retriever", "FaissRetriever", "TorchExactRetriever", "auto_nlist", "clamp_k", "resolve_factory",
           "to_distances"]
