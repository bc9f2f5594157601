"""GGUF checkpoints, de-quantised once into a float ``save_pretrained`` directory and cached.

transformers reads a GGUF file (weights and tokenizer) with ``from_pretrained(dir, gguf_file=...)``,
de-quantising every tensor to float32: tens of seconds to minutes on a CPU, every time. Here that
is done once per file: the float weights (safetensors) and the tokenizer are saved under
``<cache>/models/<file stem>-<sha256 prefix>-v<N>`` (``$RAEE_CACHE``, default ``~/.cache/raee``),
built with :func:`raee.cache.load_or_build` so that parallel jobs convert once and a killed
conversion leaves nothing that loads. Later runs load the cached directory in seconds.

Reading GGUF needs the pip packages ``gguf`` and ``accelerate`` (base dependencies of raee).
"""

from __future__ import annotations

import importlib.util
import json
import sys
import time
from pathlib import Path

from raee.assets import cache_home, sha256_file
from raee.cache import load_or_build
from raee.errors import MissingFileError, MissingPackageError, UserError

#: bump when the conversion below changes what it writes (old entries are then left unused)
CONVERSION_VERSION = 1

#: marks a finished conversion; written last, also records where it came from
SOURCE_FILE = "GGUF_SOURCE.json"


def converted_dir(gguf_file: str | Path) -> Path:
    """Cache directory of ``gguf_file``'s float copy, keyed by its name and content (sha256)."""
    gguf_file = Path(gguf_file)
    return cache_home() / "models" / f"{gguf_file.stem}-{sha256_file(gguf_file)[:16]}-v{CONVERSION_VERSION}"


def _require(package: str) -> None:
    if importlib.util.find_spec(package) is None:
        raise MissingPackageError(f"loading a GGUF checkpoint needs the pip package '{package}', which is not "
                                  f"installed: pip install gguf accelerate (both are dependencies of raee: pip install -e .)")


def check_gguf(gguf_file: Path, fix: str) -> None:
    """Raise a clear error when ``gguf_file`` is not a complete GGUF file (e.g. truncated)."""
    _require("gguf")
    from gguf import GGUFReader

    try:
        reader = GGUFReader(gguf_file)
        end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
    except Exception as err:  # noqa: BLE001 - the reader fails in many ways on a damaged file
        raise UserError(f"{gguf_file} is not a complete GGUF file ({type(err).__name__}: {err}); it is probably "
                        f"truncated or damaged: {fix}") from err
    size = gguf_file.stat().st_size
    if end > size:
        raise UserError(f"{gguf_file} is truncated: its tensors need {end} bytes, the file has {size}: {fix}")


def convert_gguf(gguf_file: Path, out: Path) -> None:
    """De-quantise ``gguf_file`` (weights and tokenizer) to float32 and ``save_pretrained`` it into ``out``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _require("accelerate")
    tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32)
    # the weights are plain float tensors now; transformers refuses to save a model it still marks as GGUF-quantised
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / SOURCE_FILE).write_text(json.dumps({"gguf_file": str(gguf_file), "name": gguf_file.name,
                                               "bytes": gguf_file.stat().st_size, "sha256": sha256_file(gguf_file),
                                               "conversion_version": CONVERSION_VERSION}, indent=1) + "\n")


def _check_converted(directory: Path) -> Path:
    """A loadable conversion: source record, config and tokenizer present, every safetensors file complete."""
    from safetensors import safe_open

    json.loads((directory / SOURCE_FILE).read_text())
    json.loads((directory / "config.json").read_text())
    if not (directory / "tokenizer_config.json").exists():
        raise MissingFileError(f"{directory} has no tokenizer_config.json")
    weights = sorted(directory.glob("*.safetensors"))
    if not weights:
        raise MissingFileError(f"{directory} has no *.safetensors weights")
    for path in weights:
        with safe_open(str(path), "pt"):  # raises on a truncated file (its header no longer covers the file)
            pass
    return directory


def cached_gguf_model(gguf_file: str | Path, *, fix: str = "download the file again") -> Path:
    """The float ``save_pretrained`` directory of ``gguf_file``, converted on first use.

    fix: what a user should do when the GGUF file itself is damaged (named in the error).
    """
    gguf_file = Path(gguf_file).expanduser().resolve()
    target = converted_dir(gguf_file)

    def build(out: Path) -> None:
        check_gguf(gguf_file, fix)
        print(f"de-quantising {gguf_file.name} once into {target} (later runs load this copy)",
              file=sys.stderr, flush=True)
        start = time.perf_counter()
        convert_gguf(gguf_file, out)
        print(f"converted {gguf_file.name} in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)

    return load_or_build(target, build, _check_converted, what=f"float copy of {gguf_file.name}")
