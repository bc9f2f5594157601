"""Exit strategies. Add one: subclass PlannedExit or DynamicExit, add conf/exit/<name>.yaml."""

from raee.exits.base import BatchContext, DynamicExit, ExitStrategy, PlannedExit
from raee.exits.entropy import EntropyExit, prediction_entropy
from raee.exits.knn import KnnExit
from raee.exits.patience import PatienceExit
from raee.exits.raee_choice import RaeeChoiceExit
from raee.exits.raee_dynamic import RaeeDynamicExit
from raee.exits.raee_exit import RaeeExit, RetrievalExit
from raee.exits.simple import FixedLayer, FullModel, OracleExit

__all__ = ["BatchContext", "DynamicExit", "ExitStrategy", "PlannedExit", "EntropyExit", "PatienceExit",
           "FixedLayer", "FullModel", "KnnExit", "OracleExit", "RaeeChoiceExit", "RaeeDynamicExit", "RaeeExit",
           "RetrievalExit", "prediction_entropy"]
