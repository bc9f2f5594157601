"""Zero-shot prompt head: template + verbalizer through the model's own LM head (RAEE paper).

For encoders the logits are read at the mask token; for causal decoders at the last real token
(the next-token prediction). At any layer the hidden state goes through the model's final norm
and LM head, and only the label words' rows of the LM head are computed (never the whole
vocabulary): :meth:`raee.backbones.base.LayerwiseBackbone.lm_logits` with ``token_ids``.

Where the template and label words come from (one-way config flow): ``head.template`` /
``head.label_words`` when given, else the data config's default prompts, which
``conf/head/prompt.yaml`` hands over as ``dataset_prompts: ${oc.select:data.prompt,null}``
({"mlm": {...}, "causal": {...}}); the kind is picked at :meth:`bind` from the backbone
(decoder -> "causal", encoder -> "mlm"). Which token stands for a label word, and the template
rules, are in :mod:`raee.heads.verbalizer`.

Calibration (``calibration="content_free"``, Zhao et al. 2021, per layer): :meth:`fit` runs the
content-free inputs (default "N/A", "", "[MASK]") through the template once and averages their
label-word probabilities at every layer, p_cf[l]; at inference the layer's probabilities are
divided by p_cf[l] and renormalised, and the head returns their logarithm. Intermediate layers
read through the LM head tend to favour one label word whatever the input; this removes that bias.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from raee.atomic import atomic_path, atomic_write_text
from raee.backbones.base import LayerState, LayerwiseBackbone
from raee.errors import UserError
from raee.heads.base import Head
from raee.heads.verbalizer import check_template, label_token_ids

#: Zhao et al. (2021)'s content-free inputs
CONTENT_FREE_INPUTS = ("N/A", "", "[MASK]")
CALIBRATIONS = (None, "content_free")
#: tokens of the text kept at least, and spare tokens for BPE merges at the text/template seams
MIN_TEXT_TOKENS, SEAM_TOKENS = 8, 4


class PromptHead(Head):
    """Args:
        template: ``{text}`` (``{text_pair}`` for pair tasks) and, for encoders, ``{mask}``; null = the
            data config's default for this kind of model.
        label_words: one word per class, by label name (a dict) or in label order (a list); null = the
            data config's default.
        dataset_prompts: the data config's ``prompt`` section, {"mlm"|"causal": {"template", "label_words"}}.
        calibration: null (raw label-word logits) or "content_free" (see the module docstring).
        content_free_inputs: the texts averaged for the calibration.
    """

    def __init__(self, template: str | None = None, label_words: Sequence[str] | Mapping[str, str] | None = None,
                 dataset_prompts: Mapping[str, Any] | None = None, calibration: str | None = None,
                 content_free_inputs: Sequence[str] = CONTENT_FREE_INPUTS) -> None:
        super().__init__()
        if calibration not in CALIBRATIONS:
            raise UserError(f"head.calibration={calibration!r} is unknown: use null or content_free")
        if calibration and not list(content_free_inputs):
            raise UserError("head.calibration=content_free needs at least one head.content_free_inputs, e.g. ['N/A']")
        if template is not None:  # fail early on what holds for any backbone; bind() checks the rest
            check_template(template, decoder="{mask}" not in template)
        self.template = template
        self.label_words = _plain(label_words)
        self.dataset_prompts = _plain(dataset_prompts)
        self.calibration = calibration
        self.content_free_inputs = [str(t) for t in content_free_inputs]
        self.needs_fit = calibration is not None
        self.register_buffer("label_ids", torch.zeros(0, dtype=torch.long), persistent=False)
        self.register_buffer("content_free_probs", torch.zeros(0), persistent=False)  # (L+1, C) once fitted
        self.kind: str | None = None  # "mlm" or "causal", set by bind()
        self.prompt_template: str | None = None  # the template in use (after bind)
        self.prompt_words: list[str] = []  # the label words in use, in label order (after bind)
        self._mask_token: str | None = None
        self._mask_token_id: int | None = None
        self._text_budget = 0
        self._trailing_specials = 0  # special tokens the tokenizer appends after the prompt (decoders)
        self._lm_logits = None  # the backbone's LM head, set by bind()

    # ------------------------------------------------------------------ binding
    def bind(self, backbone: LayerwiseBackbone, label_names: list[str]) -> None:
        super().bind(backbone, label_names)
        if not backbone.has_lm_head:
            backbone.lm_logits(torch.zeros(1, backbone.hidden_size))  # raises the explanatory error
        decoder = backbone.is_decoder
        self.kind = "causal" if decoder else "mlm"
        template, words = self._resolve_prompt(self.kind)
        self.prompt_template = check_template(template, decoder=decoder)
        if not decoder:
            if backbone.tokenizer.mask_token is None:
                raise UserError(f"tokenizer of '{backbone.name}' has no mask token; use a masked-LM backbone")
            self._mask_token = backbone.tokenizer.mask_token
            self._mask_token_id = backbone.tokenizer.mask_token_id
        self._lm_logits = backbone.lm_logits
        self.prompt_words = self._words_in_label_order(words, label_names)
        self.label_ids = torch.tensor(label_token_ids(backbone.tokenizer, self.prompt_words, backbone.name),
                                      dtype=torch.long, device=backbone.device)
        self._text_budget = self._budget(backbone)
        self._trailing_specials = _trailing_special_tokens(backbone.tokenizer) if decoder else 0
        self.content_free_probs = torch.zeros(0, device=backbone.device)

    def _resolve_prompt(self, kind: str) -> tuple[str, Any]:
        defaults = (self.dataset_prompts or {}).get(kind) or {}
        template = self.template if self.template is not None else defaults.get("template")
        words = self.label_words if self.label_words else defaults.get("label_words")
        missing = [what for what, value in (("template", template), ("label words", words)) if not value]
        if missing:
            model = "decoder (causal LM)" if kind == "causal" else "encoder (masked LM)"
            where = ("the data config has no `prompt:` section" if not self.dataset_prompts
                     else f"the data config's `prompt:` section has no complete `{kind}` entry")
            raise UserError(
                f"head=prompt has no {' and no '.join(missing)} for this {model}: {where}. Give them on the command "
                "line, e.g. head.template='{text} It was {mask}.' head.label_words='{negative: terrible, positive: "
                f"great}}', or add `prompt: {{{kind}: {{template: ..., label_words: ...}}}}` to the data config")
        return str(template), words

    def _words_in_label_order(self, words: Any, label_names: list[str]) -> list[str]:
        if isinstance(words, Mapping):
            missing = [n for n in label_names if n not in words]
            if missing:
                raise UserError(f"head.label_words has no word for classes {missing}; it has {list(words)} "
                                f"(the dataset's classes are {label_names})")
            return [str(words[n]) for n in label_names]
        words = [str(w) for w in words]
        if len(words) != len(label_names):
            raise UserError(f"head.label_words has {len(words)} words but the dataset has {len(label_names)} classes "
                            f"{label_names}: give one word per class")
        return words

    def _budget(self, backbone: LayerwiseBackbone) -> int:
        """Tokens left for the text (each half for pair tasks) once the template and special tokens are in."""
        tok = backbone.tokenizer
        filled = self.prompt_template.format(text="", text_pair="", mask=self._mask_token or "")
        overhead = len(tok(filled, add_special_tokens=True)["input_ids"])
        budget = backbone.max_length - overhead - SEAM_TOKENS
        if budget < MIN_TEXT_TOKENS:
            raise UserError(f"the prompt template takes {overhead} of backbone.max_length={backbone.max_length} "
                            f"tokens, leaving {max(budget, 0)} for the text: raise backbone.max_length or shorten "
                            "head.template")
        return budget

    # ------------------------------------------------------------------ inputs
    def format(self, texts: list[str], text_pairs: list[str] | None,
               backbone: LayerwiseBackbone) -> tuple[list[str], list[str] | None]:
        # Cut the text (never the template) so that truncation keeps the answer position (mask or last token).
        if text_pairs is not None and "{text_pair}" not in self.prompt_template:
            raise UserError(f"the data has sentence pairs but the prompt template {self.prompt_template!r} has no "
                            "{text_pair}: the second sentence would be dropped; add {text_pair} to head.template")
        tok = backbone.tokenizer
        budget = self._text_budget // 2 if text_pairs is not None else self._text_budget

        def cut(t: str) -> str:
            if self._mask_token:  # a mask token inside the text would be a second answer slot
                t = t.replace(self._mask_token, tok.unk_token or "")
            ids = tok(t, add_special_tokens=False, truncation=True, max_length=budget)["input_ids"]
            return tok.decode(ids) if len(ids) >= budget else t

        out = []
        for i, text in enumerate(texts):
            pair = cut(text_pairs[i]) if text_pairs is not None else ""
            out.append(self.prompt_template.format(text=cut(text), text_pair=pair, mask=self._mask_token or ""))
        return out, None

    def text_margins(self, backbone: LayerwiseBackbone) -> tuple[int, int]:
        """(tokens before the text, tokens after it) in a formatted input: the template's two sides and the
        special tokens, for keys pooled over the text alone (``key_encoder.pooling=text``). The space before
        the text joins the text's first token, so the left side is counted without it."""
        if self.prompt_template is None:
            raise RuntimeError("the prompt head is not bound: call bind(backbone, label_names) first")
        if "{text_pair}" in self.prompt_template:
            raise UserError("key_encoder.pooling=text pools one text, but this prompt holds a pair ({text_pair}): "
                            "use pooling=mean or last")
        before, _, after = self.prompt_template.partition("{text}")
        tok, mask = backbone.tokenizer, self._mask_token or ""
        left = len(tok(before.rstrip(" ").format(mask=mask))["input_ids"]) - self._trailing_specials
        right = len(tok(after.format(mask=mask), add_special_tokens=False)["input_ids"]) + self._trailing_specials
        return left, right

    def positions(self, state: LayerState) -> torch.Tensor:
        """(B,) index of the token whose LM prediction is read."""
        if self.kind == "causal":  # the prompt's last token, before any appended special token (EOS, [SEP])
            return state.attention_mask.sum(1).long() - 1 - self._trailing_specials
        is_mask = state.input_ids == self._mask_token_id
        if not bool(is_mask.any(1).all()):
            raise UserError("an input lost its mask token (truncated?); raise backbone.max_length")
        return is_mask.float().argmax(1)

    # ------------------------------------------------------------------ scoring
    def label_logits(self, state: LayerState) -> torch.Tensor:
        """(B, C) uncalibrated logits of the label words: only their rows of the LM head are computed."""
        if self._lm_logits is None:
            raise RuntimeError("the prompt head is not bound: call bind(backbone, label_names) first")
        rows = torch.arange(state.batch_size, device=state.hidden.device)
        hidden = state.hidden[rows, self.positions(state)]  # (B, H)
        return self._lm_logits(hidden, self.label_ids)

    def forward(self, state: LayerState) -> torch.Tensor:
        logits = self.label_logits(state)
        if self.calibration is None:
            return logits
        if self.content_free_probs.numel() == 0:
            raise RuntimeError("head.calibration=content_free is not fitted: run raee.experiment.prepare_head (it "
                               "calls fit) or load() a saved calibration")
        reference = self.content_free_probs[state.layer].to(logits.device)  # (C,)
        # log of (p / p_cf) renormalised: the calibrated probabilities' logarithm
        return torch.log_softmax(torch.log_softmax(logits.float(), -1) - reference.log(), -1)

    @torch.no_grad()
    def fit(self, backbone: LayerwiseBackbone, datamodule: Any = None, progress: bool = True) -> None:
        """Content-free calibration: average label-word probabilities of the content-free inputs per layer."""
        if self.calibration is None:
            return
        if self.prompt_template is None:
            raise RuntimeError("bind the prompt head before fitting its calibration")
        inputs = list(self.content_free_inputs)
        pairs = inputs if "{text_pair}" in self.prompt_template else None
        texts, _ = self.format(inputs, pairs, backbone)
        enc = {k: v.to(backbone.device) for k, v in backbone.tokenize(texts).items()}
        probs = [torch.softmax(self.label_logits(s).float(), -1).mean(0) for s in backbone.all_layers(**enc)]
        table = torch.stack(probs).clamp(min=torch.finfo(torch.float32).tiny)  # (L+1, C)
        self.content_free_probs = (table / table.sum(-1, keepdim=True)).to(backbone.device)

    # ------------------------------------------------------------------ persistence
    def save(self, directory: str | Path, backbone: LayerwiseBackbone | None = None) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        with atomic_path(directory / "calibration.safetensors") as tmp:
            save_file({"content_free_probs": self.content_free_probs.float().cpu().contiguous()}, str(tmp))
        atomic_write_text(directory / "head.json", json.dumps(self.describe() | {"label_names": self.label_names}))

    def load(self, directory: str | Path, backbone: LayerwiseBackbone | None = None) -> None:
        directory = Path(directory)
        meta = json.loads((directory / "head.json").read_text())
        if meta.get("label_names") != self.label_names or meta.get("label_words") != self.prompt_words:
            raise UserError(f"the calibration saved in {directory} is for classes {meta.get('label_names')} with label "
                            f"words {meta.get('label_words')}, not {self.label_names} / {self.prompt_words}: refit it")
        table = load_file(str(directory / "calibration.safetensors"))["content_free_probs"]
        if tuple(table.shape) != (self.num_layers + 1, self.num_classes):
            raise UserError(f"the calibration saved in {directory} has shape {tuple(table.shape)}, expected "
                            f"({self.num_layers + 1}, {self.num_classes}) for this backbone and task: refit it")
        self.content_free_probs = table.to(self.label_ids.device)

    def describe(self) -> dict[str, Any]:
        out = {"type": "prompt", "template": self.prompt_template or self.template,
               "label_words": self.prompt_words or _plain(self.label_words)}
        if self.calibration is not None:  # absent when off, so databases built before calibration stay valid
            out |= {"calibration": self.calibration, "content_free_inputs": list(self.content_free_inputs)}
        return out


def _trailing_special_tokens(tokenizer: Any) -> int:
    """How many special tokens the tokenizer appends after a text (0 for GPT-2/Llama/Gemma; 1 for an
    EOS-appending tokenizer or a BERT tokenizer put on a decoder, as the tiny test models do)."""
    plain = tokenizer("a b", add_special_tokens=False)["input_ids"]
    full = tokenizer("a b")["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start:start + len(plain)] == plain:
            return len(full) - start - len(plain)
    return 0


def _plain(value: Any) -> Any:
    """OmegaConf containers (a config instantiated without ``_convert_``) as plain dicts and lists."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
