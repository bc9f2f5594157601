"""raee: early-exit inference experiments for transformer classifiers.

Where things live:
- ``raee.backbones``  layer-by-layer wrappers of Hugging Face models (the exit loop steps through them)
- ``raee.heads``      map the hidden state of any layer to class logits (prompt, prototype, linear)
- ``raee.exits``      exit strategies (full, fixed, entropy, patience, oracle, raee, hashee)
- ``raee.exit_loop``  the loop that runs a batch layer by layer and drops exited examples
- ``raee.retrieval``  nearest-neighbour search (FAISS, torch) for RAEE
- ``raee.aggregation`` rules that turn neighbours' exit information into an exit layer
- ``raee.module``     the LightningModule that runs and measures an exit strategy
- ``raee.run``        the Hydra entry point (``python -m raee.run``)
- ``raee.errors``     the errors raee raises on purpose (a user's mistake); ``raee.cli`` prints them as one paragraph
"""

__version__ = "0.1.0"
