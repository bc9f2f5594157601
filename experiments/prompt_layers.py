"""Per-layer accuracy of the prompt head, without and with content-free calibration (not a test).

For every layer 0..L of the backbone, reads the prompt head (template + label words through the
final norm and LM head) on the first N test examples and prints the accuracy and the share of the
most frequent predicted class, raw and calibrated (Zhao et al. 2021, per layer), plus the oracle
(some layer right). It tells whether intermediate layers carry the task or mostly predict one
class, which decides the defaults of the real-LM experiments.

    python experiments/prompt_layers.py backbone=smollm2 data=rotten_tomatoes --examples 300
    # before backbone=smollm2 exists (or for any GGUF file): load the GGUF with transformers
    python experiments/prompt_layers.py data=rotten_tomatoes --gguf smollm2 --examples 300

Hydra overrides (backbone=, data=, head.template=, head.label_words=, head.content_free_inputs=)
pick the setup; --out writes the table as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("WANDB_MODE", "disabled")

import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.utils import instantiate  # noqa: E402

from raee.cli import user_errors  # noqa: E402
from raee.features import encode_batch  # noqa: E402
from raee.run import CONF_DIR  # noqa: E402

GGUF_ASSETS = {"smollm2": "SMOLLM2_GGUF", "gemma3_270m": "GEMMA3_270M_GGUF"}


def load_gguf_backbone(name: str, max_length: int):
    """A packaged GGUF model as a layer-by-layer backbone, straight through transformers (Llama family)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import raee.assets as assets
    from raee.backbones.decoder import LlamaBackbone

    path = Path(name) if Path(name).exists() else assets.asset_path(getattr(assets, GGUF_ASSETS[name]))
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    tok.padding_side = "right"
    tok.pad_token = tok.pad_token or tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    return LlamaBackbone(model.model, tok, name=path.stem, max_length=max_length, lm_head=model.lm_head)


def majority_share(preds: torch.Tensor, num_classes: int) -> float:
    return float(torch.bincount(preds, minlength=num_classes).max()) / max(1, preds.numel())


@torch.no_grad()
def per_layer(backbone, head, datamodule, examples: int, batch_size: int) -> dict:
    test = datamodule.split("test")
    n = min(examples, len(test))
    raw_preds, cal_preds, labels = [], [], []
    start = time.perf_counter()
    for lo in range(0, n, batch_size):
        items = [test[i] for i in range(lo, min(n, lo + batch_size))]
        batch = {"text": [x["text"] for x in items], "text_pair": None}
        states = backbone.all_layers(**encode_batch(backbone, head, batch))
        raw = torch.stack([torch.softmax(head.label_logits(s).float(), -1) for s in states], 1)  # (B, L+1, C)
        cal = raw / head.content_free_probs.unsqueeze(0).cpu()
        raw_preds.append(raw.argmax(-1))
        cal_preds.append(cal.argmax(-1))
        labels.append(torch.tensor([int(x["label"]) for x in items]))
    seconds = time.perf_counter() - start
    y = torch.cat(labels)
    out = {"examples": n, "seconds": seconds, "num_classes": head.num_classes, "layers": []}
    for name, preds in (("raw", torch.cat(raw_preds)), ("calibrated", torch.cat(cal_preds))):
        correct = preds == y.unsqueeze(1)
        out[f"oracle_{name}"] = float(correct.any(1).float().mean())
        for layer in range(preds.shape[1]):
            if len(out["layers"]) <= layer:
                out["layers"].append({"layer": layer})
            out["layers"][layer] |= {f"acc_{name}": float(correct[:, layer].float().mean()),
                                     f"majority_{name}": majority_share(preds[:, layer], head.num_classes)}
    out["label_majority"] = majority_share(y, head.num_classes)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. backbone=smollm2 data=imdb")
    parser.add_argument("--gguf", default=None, help="smollm2, gemma3_270m or a .gguf path: load it directly")
    parser.add_argument("--examples", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=None, help="write the table as JSON here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=["head=prompt", *args.overrides])
    started = time.perf_counter()
    backbone = load_gguf_backbone(args.gguf, args.max_length) if args.gguf else instantiate(cfg.backbone)
    print(f"loaded {backbone.name} ({backbone.num_layers} layers) in {time.perf_counter() - started:.1f} s")
    datamodule = instantiate(cfg.data)
    datamodule.setup("test")
    head = instantiate(cfg.head, calibration="content_free")
    head.bind(backbone, list(datamodule.label_names))
    head.fit(backbone)
    print(f"template {head.prompt_template!r}, label words {head.prompt_words}, "
          f"content-free inputs {head.content_free_inputs}")
    table = per_layer(backbone, head, datamodule, args.examples, args.batch_size)
    print(f"{table['examples']} test examples of {datamodule.name} in {table['seconds']:.1f} s; majority label share "
          f"{table['label_majority']:.3f}")
    print("layer  acc_raw  majority_raw  acc_cal  majority_cal")
    for row in table["layers"]:
        print(f"{row['layer']:5d}  {row['acc_raw']:.3f}    {row['majority_raw']:.3f}       {row['acc_calibrated']:.3f}"
              f"    {row['majority_calibrated']:.3f}")
    print(f"oracle (some layer right): raw {table['oracle_raw']:.3f}, calibrated {table['oracle_calibrated']:.3f}")
    if args.out:
        Path(args.out).write_text(json.dumps(table | {"backbone": backbone.name, "data": datamodule.name,
                                                      "template": head.prompt_template,
                                                      "label_words": head.prompt_words}, indent=2))


if __name__ == "__main__":
    with user_errors():  # a user's error: one paragraph, exit status 2
        main()
