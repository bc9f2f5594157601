"""Data layer: example sources, in-memory text datasets, seeded splits and the Lightning data module."""

from raee.data.datamodule import TextClassificationDataModule
from raee.data.dataset import TextDataset, collate_batch
from raee.data.generation import GENERATION, load_bbcnews_headlines
from raee.data.labels import encode_labels
from raee.data.sources import RawData, bbcnews_dir, load_bbcnews, load_hub, load_local, read_table
from raee.data.splitting import partition, subsample

__all__ = ["TextClassificationDataModule", "TextDataset", "collate_batch", "encode_labels", "RawData", "GENERATION",
           "load_bbcnews_headlines",
           "bbcnews_dir", "load_bbcnews", "load_hub", "load_local", "read_table", "partition", "subsample"]
