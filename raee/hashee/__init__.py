"""HashEE: token-level early exit with hash-assigned exit layers (Sun et al. 2022)."""

from raee.hashee.hashing import (HASHES, cluster_hash, count_token_labels, count_tokens, frequency_hash,
                                 mutual_information_hash, occurrence_random_layers, random_hash)
from raee.hashee.strategy import HashEEExit
from raee.hashee.token_layer import (forward_with_token_exits, run_token_exit_layer, token_exit_flops,
                                     token_exit_macs)

__all__ = ["HASHES", "HashEEExit", "cluster_hash", "count_token_labels", "count_tokens", "forward_with_token_exits",
           "frequency_hash", "mutual_information_hash", "occurrence_random_layers", "random_hash",
           "run_token_exit_layer", "token_exit_flops", "token_exit_macs"]
