"""Retrievers for RAEE. Add one: subclass Retriever, add conf/retriever/<name>.yaml."""

from raee.retrieval.base import Retriever, clamp_k, to_distances
from raee.retrieval.faiss_index import FaissRetriever, resolve_factory
from raee.retrieval.torch_exact import TorchExactRetriever

__all__ = ["Retriever", "FaissRetriever", "TorchExactRetriever", "clamp_k", "to_distances", "resolve_factory"]
