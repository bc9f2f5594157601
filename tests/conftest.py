"""Shared fixtures: tiny models built from configs, so tests run in seconds on 2 CPU cores."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from types import ModuleType

os.environ.setdefault("WANDB_MODE", "disabled")  # never touch the network from tests
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from raee.backbones import load_backbone  # noqa: E402

TINY_CONFIGS = {
    "bert": dict(model_type="bert", num_hidden_layers=4, hidden_size=32, num_attention_heads=4, intermediate_size=64),
    "roberta": dict(model_type="roberta", num_hidden_layers=3, hidden_size=32, num_attention_heads=4,
                    intermediate_size=64, max_position_embeddings=140),
    "distilbert": dict(model_type="distilbert", n_layers=3, dim=32, n_heads=4, hidden_dim=64),
    "gpt2": dict(model_type="gpt2", n_layer=3, n_embd=32, n_head=4),
    "llama": dict(model_type="llama", num_hidden_layers=3, hidden_size=32, num_attention_heads=4,
                  intermediate_size=64, num_key_value_heads=2),
    # sliding-window layers of 4 tokens alternate with global ones, so both masks matter on TEXTS
    "gemma3": dict(model_type="gemma3_text", num_hidden_layers=4, hidden_size=32, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=8, intermediate_size=64, query_pre_attn_scalar=8,
                   sliding_window=4, sliding_window_pattern=2),
}

#: the repository's experiments/ scripts (not a package: loaded by path)
EXPERIMENTS_DIR = Path(__file__).resolve().parents[1] / "experiments"


def load_experiment(name: str) -> ModuleType:
    """experiments/<name>.py as a module, so a test calls its functions and main() directly."""
    spec = importlib.util.spec_from_file_location(name, EXPERIMENTS_DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


#: opt-in for the real_lm tests (real causal LMs, minutes on 2 CPU cores)
REAL_LM_ENV = "RAEE_REAL_LM"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--real-lm", action="store_true",
                     help=f"also run the tests marked real_lm (real causal LMs, minutes; or {REAL_LM_ENV}=1)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--real-lm") or os.environ.get(REAL_LM_ENV) == "1":
        return
    skip = pytest.mark.skip(reason=f"real-LM check (minutes): run with --real-lm or {REAL_LM_ENV}=1")
    for item in items:
        if "real_lm" in item.keywords:
            item.add_marker(skip)


TEXTS = ["the match ended in a draw after extra time", "shares fell sharply on monday",
         "a new phone", "the film won three awards at the festival last night, beating every rival",
         "parliament debated the bill", "short"]


def assert_layers_match_hf(bb, states: list, hf_hidden_states: tuple, attention_mask: torch.Tensor,
                           atol: float = 1e-5) -> None:
    """Our layer 0..L states equal Hugging Face's ``output_hidden_states`` at the real tokens.

    HF replaces its last entry by the final-normed output (decoders), so layer L is compared
    through :meth:`final_norm` (the identity for post-norm encoders).
    """
    assert len(states) == len(hf_hidden_states) == bb.num_layers + 1
    real = attention_mask.bool()
    for state, expected in zip(states, hf_hidden_states):
        hidden = bb.final_norm(state.hidden) if state.layer == bb.num_layers else state.hidden
        torch.testing.assert_close(hidden[real], expected[real], atol=atol, rtol=1e-5)


def assert_backbone_matches_hf_lm(bb, lm: torch.nn.Module, texts: list[str]) -> tuple[list, dict]:
    """``bb``'s layer states and final LM logits equal the full HF LM ``lm`` on ``texts``; returns (states, enc)."""
    enc = bb.tokenize(texts)
    states = bb.all_layers(**enc)
    with torch.no_grad():
        out = lm(**enc, output_hidden_states=True)
    assert_layers_match_hf(bb, states, out.hidden_states, enc["attention_mask"])
    real = enc["attention_mask"].bool()
    torch.testing.assert_close(bb.lm_logits(states[-1].hidden)[real], out.logits[real], atol=1e-4, rtol=1e-4)
    return states, enc


@pytest.fixture(scope="module")
def single_thread():
    """One torch thread while a module's tests run (``pytestmark = pytest.mark.usefixtures("single_thread")``):
    tiny models issue thousands of small ops, and on a loaded 2-core machine every op's hand-off between two
    threads waits for the scheduler (measured: a tiny decoding loop 30x slower with 2 threads than with 1)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_backbones() -> dict:
    return {name: load_backbone(tiny=cfg, max_length=64) for name, cfg in TINY_CONFIGS.items()}


@pytest.fixture()
def tiny_bert(tiny_backbones):
    bb = tiny_backbones["bert"]
    bb.reset_counters()
    return bb


def make_batch(n: int = 6, num_classes: int = 3) -> dict:
    texts = (TEXTS * ((n + len(TEXTS) - 1) // len(TEXTS)))[:n]
    return {"text": texts, "text_pair": None, "label": torch.arange(n) % num_classes, "index": torch.arange(n)}


class ListDataModule:
    """A datamodule-shaped object over in-memory examples (tests need no files)."""

    def __init__(self, texts: list[str], labels: list[int], label_names: list[str], batch_size: int = 4,
                 name: str = "toy") -> None:
        self.texts, self.labels, self.label_names = texts, labels, label_names
        self.batch_size, self.name, self.seed, self.task_metric = batch_size, name, 0, "accuracy"

    def setup(self, stage: str | None = None) -> None:
        pass

    def split(self, name: str) -> list:
        return list(zip(self.texts, self.labels))

    def _batches(self) -> torch.utils.data.DataLoader:
        out = []
        for start in range(0, len(self.texts), self.batch_size):
            sl = slice(start, start + self.batch_size)
            out.append({"text": self.texts[sl], "text_pair": None, "label": torch.tensor(self.labels[sl]),
                        "index": torch.arange(len(self.texts))[sl]})
        return torch.utils.data.DataLoader(out, batch_size=None)  # pre-built batches, in order

    train_dataloader = val_dataloader = test_dataloader = predict_dataloader = _batches


def toy_datamodule(n: int = 24, batch_size: int = 4) -> ListDataModule:
    """Three separable topics (sport / money / film), n examples."""
    topics = [("sport", "the team won the match and the striker scored a goal"),
              ("money", "shares and markets fell as the bank raised interest rates"),
              ("film", "the actor starred in a film that won an award at the festival")]
    texts, labels = [], []
    for i in range(n):
        c = i % 3
        words = topics[c][1].split()
        texts.append(" ".join(words[i % 4:] + words[: i % 4]))
        labels.append(c)
    return ListDataModule(texts, labels, [t for t, _ in topics], batch_size=batch_size)


def minilm_on_bbcnews(max_train_examples: int, max_eval_examples: int) -> tuple:
    """The default configuration's real pieces (real_model tests): all-MiniLM-L6-v2, a seeded BBC News subsample
    and its prototype head fitted -> (backbone, datamodule, head)."""
    from raee.data import TextClassificationDataModule
    from raee.experiment import prepare_head
    from raee.heads import PrototypeHead

    backbone = load_backbone("sentence-transformers/all-MiniLM-L6-v2")
    data = TextClassificationDataModule("bbcnews", max_train_examples=max_train_examples,
                                        max_eval_examples=max_eval_examples, seed=42)
    data.setup()
    head = PrototypeHead()
    prepare_head(backbone, head, data, cache_dir=None, progress=False)
    return backbone, data, head
