"""Prompts for generation tasks: the LM head "head" (``head=lm``) turns a source text into prompt token ids.

A generation task reads the next token from the backbone's own LM head, so its head has no weights:
it formats. The prompt is the data config's (``data.prompt.generation``) unless the head overrides it:

- ``template`` for plain language models, which continue after it (``"Article: {text}\\nHeadline:"``);
- ``message``, the user turn of an instruction-tuned model's chat template (``chat_template=auto`` uses
  the tokenizer's template when it has one; ``true`` requires one; ``false`` never uses it).

The source is cut to ``max_source_tokens`` tokens (at a token boundary of the original text) before it
is put into the prompt. Targets are encoded as the model writes them: the target's tokens, then the
end token (the tokenizer's end of sequence / end of turn). Prompt ids + target ids are exactly what
the decoding loop sees when it generates the target, so teacher-forced training and decoding agree.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from raee.backbones.base import LayerwiseBackbone
from raee.errors import UserError

#: fallback prompts when neither the head nor the data config gives one
DEFAULT_TEMPLATE = "{text}\n"
DEFAULT_MESSAGE = "{text}"
CHAT_CHOICES = ("auto", True, False)
#: head.finetune: the fine-tune every method of a run shares (None = the backbone as loaded)
SHARED_FINETUNES = (None, "last", "joint")


def _check_template(value: str, what: str) -> str:
    if "{text}" not in value:
        raise UserError(f"{what}={value!r} has no {{text}} placeholder: put {{text}} where the source goes")
    return value


def _fill(template: str, text: str) -> str:
    # str.replace, not str.format: sources and templates may hold braces of their own
    return template.replace("{text}", text)


class LMHead:
    """The backbone's LM head on a generation task: prompt formatting and target encoding (no weights).

    Lifecycle: construct from config -> :meth:`bind` to a backbone (and the data module, for its
    default prompt and ``max_source_tokens``) -> :meth:`encode_prompt` / :meth:`encode_example`.
    """

    #: generation reads tokens from the backbone's LM head; nothing to fit
    needs_fit = False

    def __init__(self, template: str | None = None, message: str | None = None, system: str | None = None,
                 chat_template: str | bool = "auto", dataset_prompts: Mapping[str, Any] | None = None,
                 max_source_tokens: int | None = None, pooling: str | None = None, finetune: str | None = None,
                 budget: Mapping[str, Any] | None = None) -> None:
        # pooling: accepted and unused. exit=hashee's config sets head.pooling for classification's linear head,
        # and lands on this head when a generation run names head=lm with exit=hashee
        if chat_template not in CHAT_CHOICES:
            raise UserError(f"head.chat_template={chat_template!r}: use auto (the tokenizer's chat template when it "
                            "has one), true (require one) or false (the plain template)")
        self.template_setting, self.message_setting, self.system = template, message, system
        self.chat_template = chat_template
        self.dataset_prompts = dict(dataset_prompts or {})
        self.max_source_tokens = max_source_tokens
        if finetune not in SHARED_FINETUNES:
            raise UserError(f"head.finetune={finetune!r}: use null (the backbone as loaded), last (the LM loss at the "
                            "last layer) or joint (CALM's loss at every layer)")
        self.finetune = finetune
        self.finetune_budget = dict(budget or {})
        self.trained: dict[str, Any] | None = None
        self.backbone: LayerwiseBackbone | None = None
        self.use_chat = False
        self.template = DEFAULT_TEMPLATE
        self.message = DEFAULT_MESSAGE

    # ------------------------------------------------------------------ binding
    def bind(self, backbone: LayerwiseBackbone, datamodule: Any = None) -> None:
        """Attach to ``backbone`` (it must have an LM head and a causal decoder) and take the data module's default
        prompt and ``max_source_tokens`` where the head sets none."""
        if not backbone.has_lm_head:
            raise UserError(f"backbone '{backbone.name}' has no language-model head (its checkpoint was saved without "
                            "LM weights), so it cannot generate text: use a causal LM with its head, e.g. "
                            "backbone=smollm2 or backbone=gemma3_270m")
        if not backbone.is_decoder:
            raise UserError(f"backbone '{backbone.name}' is a bidirectional encoder: generation needs a causal "
                            "decoder (backbone=smollm2, gemma3_270m, gpt2, or a tiny_* decoder)")
        prompts = self.dataset_prompts or dict(getattr(datamodule, "prompt", None) or {})
        defaults = dict(prompts.get("generation") or {})
        self.template = _check_template(self.template_setting or defaults.get("template") or DEFAULT_TEMPLATE,
                                        "head.template")
        self.message = _check_template(self.message_setting or defaults.get("message") or DEFAULT_MESSAGE,
                                       "head.message")
        has_chat = bool(getattr(backbone.tokenizer, "chat_template", None))
        if self.chat_template is True and not has_chat:
            raise UserError(f"head.chat_template=true but the tokenizer of '{backbone.name}' has no chat template: "
                            "set head.chat_template=auto or false (the plain template)")
        self.use_chat = has_chat and self.chat_template is not False
        if self.max_source_tokens is None and datamodule is not None:
            self.max_source_tokens = getattr(datamodule, "max_source_tokens", None)
        self.backbone = backbone

    @property
    def tokenizer(self) -> Any:
        if self.backbone is None:
            raise RuntimeError("LMHead is not bound to a backbone yet: call bind(backbone, datamodule) first")
        return self.backbone.tokenizer

    def describe(self) -> dict[str, Any]:
        """What decides the prompt ids, and the shared fine-tune when there is one (summaries, cache keys)."""
        out = {"type": type(self).__name__, "chat": self.use_chat,
               "prompt": self.message if self.use_chat else self.template, "system": self.system,
               "max_source_tokens": self.max_source_tokens}
        if self.finetune:
            out["finetune"] = {"loss": self.finetune, **self.finetune_budget}
        return out

    # ------------------------------------------------------------------ the shared fine-tune
    def fit(self, backbone: LayerwiseBackbone, datamodule: Any, cache_dir: Any = None, progress: bool = True) -> None:
        """Fine-tune the backbone with ``head.finetune``'s loss and the shared budget, once per content (the weights
        every method of the run then uses; :func:`raee.generation.finetune.finetune_lm`). Nothing when unset."""
        if not self.finetune:
            return
        from raee.generation import finetuning

        self.trained = finetuning.finetune(f"head.finetune={self.finetune}", backbone, self, datamodule,
                                           loss=self.finetune, settings=dict(self.finetune_budget),
                                           cache_dir=cache_dir, progress=progress)

    def budget(self) -> dict[str, Any] | None:
        """The shared fine-tune's budget record (None: the backbone as loaded)."""
        return self.trained

    # ------------------------------------------------------------------ prompts
    def cut_source(self, text: str) -> str:
        """``text`` cut after its first ``max_source_tokens`` tokens (at a token boundary of the original text)."""
        n = self.max_source_tokens
        if n is None:
            return text
        tok = self.tokenizer
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        if len(enc["input_ids"]) <= n:
            return text
        return text[: enc["offset_mapping"][n - 1][1]]

    def prompt_text(self, source: str) -> str:
        """The prompt as text: the chat template rendered up to the assistant's turn, or the plain template."""
        source = self.cut_source(source)
        if not self.use_chat:
            return _fill(self.template, source)
        messages = ([{"role": "system", "content": self.system}] if self.system else []) + [
            {"role": "user", "content": _fill(self.message, source)}]
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def encode_prompt(self, source: str) -> list[int]:
        """Prompt token ids of ``source``. A chat template writes its own special tokens; a plain prompt gets the
        tokenizer's (e.g. Gemma's <bos>) without any it appends at the end (BERT-style [SEP]: an end token)."""
        text = self.prompt_text(source)
        if self.use_chat:
            return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        ids = list(self.tokenizer(text, add_special_tokens=True)["input_ids"])
        plain = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        if len(ids) > len(plain) and ids[-1] in self.end_ids and (not plain or plain[-1] != ids[-1]):
            ids = ids[:-1]
        if not ids:
            raise UserError(f"the prompt of source {source[:60]!r} encodes to no tokens: give a non-empty source")
        return ids

    def encode_target(self, target: str) -> list[int]:
        """Target token ids as the model writes them after the prompt: its tokens, then the end token."""
        ids = list(self.tokenizer(target, add_special_tokens=False)["input_ids"])
        return ids + [self.end_id]

    def encode_example(self, source: str, target: str) -> tuple[list[int], int]:
        """(prompt ids + target ids, prompt length): a teacher-forced training sequence; the loss is on the
        positions from prompt length - 1 on (each predicts the next target token)."""
        prompt = self.encode_prompt(source)
        return prompt + self.encode_target(target), len(prompt)

    def decode(self, ids: list[int], one_line: bool = False) -> str:
        """Generated ids -> text without special tokens; ``one_line``: cut at the first line break."""
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        if one_line:
            text = text.strip("\n").split("\n", 1)[0]
        return text.strip()

    # ------------------------------------------------------------------ end tokens
    @property
    def end_ids(self) -> set[int]:
        """Token ids that end a generation: the tokenizer's end of sequence, the model's configured ones."""
        return end_token_ids(self.backbone) if self.backbone is not None else set()

    @property
    def end_id(self) -> int:
        """The end token a target is written with (the tokenizer's eos, else the model's)."""
        tok_eos = getattr(self.tokenizer, "eos_token_id", None)
        if tok_eos is not None:
            return int(tok_eos)
        ids = sorted(self.end_ids)
        if not ids:
            raise UserError(f"backbone '{self.backbone.name}' has no end-of-sequence token (tokenizer and config name "
                            "none): generation cannot know where a text ends")
        return ids[0]


def end_token_ids(backbone: LayerwiseBackbone) -> set[int]:
    """Every id that ends a generation: the tokenizer's eos and the model config's / generation config's eos."""
    ids: set[int] = set()
    candidates = [getattr(backbone.tokenizer, "eos_token_id", None), getattr(backbone.config, "eos_token_id", None)]
    generation_config = getattr(backbone.model, "generation_config", None)
    if generation_config is not None:
        candidates.append(getattr(generation_config, "eos_token_id", None))
    for value in candidates:
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if v is not None:
                ids.add(int(v))
    return ids


def newline_token_ids(tokenizer: Any) -> set[int]:
    """Ids of the tokens whose text holds a line break (a one-line target stops at the first of them once it has
    begun). Decoded once per tokenizer and kept on it."""
    cached = getattr(tokenizer, "_raee_newline_ids", None)
    if cached is None:
        texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
        cached = {i for i, t in enumerate(texts) if "\n" in t}
        try:
            tokenizer._raee_newline_ids = cached
        except AttributeError:  # a tokenizer that refuses attributes: decode again next time
            pass
    return cached


def is_generation_task(datamodule: Any) -> bool:
    """True for a data module whose examples are (source, target) text pairs."""
    return getattr(datamodule, "task_type", None) == "generation"
