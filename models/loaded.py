"""`LoadedModel`: a model ready to run, with its tokenizer and where it came from.

What every loader returns (models.runtime.load, models.bundle.load_bundle) and what engines,
exporters and servers take; it imports no loader.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from models.chat import takes_tools
from models.config import ModelConfig
from models.generate import Generator
from models.kvpred import KVVariant, PredictorSet, PredictorSpec, find_predictors
from models.quant import QuantLinear, weight_bytes
from models.skip import RouterSet, SkipVariant, find_routers
from models.tokenizer import GGUFTokenizer
from models.transformer import Transformer


@dataclass
class LoadedModel:
    """A model ready to run: weights, tokenizer, and where they came from."""

    model: Transformer
    tokenizer: GGUFTokenizer
    path: Path
    quant: str | None = None
    """The precision served, as describe() reports it (e.g. "source(q4_1->int4,q8_0->int8)");
    None: read off the model ("int4", "int8" or "fp32")."""
    routers: RouterSet | None = None
    """Its layer-skipping routers (models.skip.find_routers), when trained for it as served."""
    drafts: dict = dataclasses.field(default_factory=dict)
    """The lossless mode's draft-length state a skip ratio, kept across requests (models.generate)."""
    predictors: PredictorSet | None = None
    """Its KV predictors (models.kvpred.find_predictors), when trained for it as served."""

    @property
    def config(self) -> ModelConfig:
        return self.model.cfg

    def attach_routers(self, name: str) -> str:
        """Attach the layer-skipping routers trained for model `name` as this serves it
        (models.skip.find_routers), or none; returns a note for people. Routers trained for another
        model, precision or layer count raise RouterMismatch (an InvalidRequest naming the file).
        A bundle's own routers (models.bundle, checked at load) are kept."""
        if self.routers is not None:
            return "layer skipping at ratios " + ", ".join(f"{r:g}" for r in self.skip_ratios) + " (its bundle's)"
        self.routers = find_routers(name, self.served_quant, self.config.n_layers, self.config.dim)
        if self.routers is None:
            return f"no layer skipping (train routers: tandem models train-routers {name})"
        return "layer skipping at ratios " + ", ".join(f"{r:g}" for r in self.skip_ratios)

    def attach_predictors(self, name: str) -> str:
        """Attach the KV predictors trained for model `name` as this serves it
        (models.kvpred.find_predictors), or none; returns a note for people. Predictors trained
        for another model, precision or shape raise KVMismatch (an InvalidRequest naming the file).
        A bundle's own predictors (models.bundle, checked at load) are kept."""
        own = " (its bundle's)" if self.predictors is not None else ""
        if self.predictors is None:
            self.predictors = find_predictors(PredictorSpec.of(self.model, name, self.served_quant))
        if self.predictors is None:
            return f"no KV prediction (train predictors: tandem models train-kv {name})"
        return "KV prediction at depths " + ", ".join(f"{d:g}" for d in self.predictors.depths) + own

    @property
    def kv_variants(self) -> list[KVVariant]:
        """Its KV-prediction variants as measured at training (empty: no predictors)."""
        return self.predictors.variants() if self.predictors is not None else []

    @property
    def skip_variants(self) -> list[SkipVariant]:
        """Its layer-skipping variants, one a trained ratio, with their measured agreement (empty: no routers)."""
        return self.routers.variants() if self.routers is not None else []

    @property
    def skip_ratios(self) -> list[float]:
        """The skip ratios its routers were trained for (empty: no layer skipping)."""
        return sorted(self.routers.by_ratio) if self.routers is not None else []

    def generator(self) -> Generator:
        return Generator(self.model, self.tokenizer, self.routers, self.drafts, self.predictors)

    @property
    def served_quant(self) -> str:
        """The precision served: the loader's `quant`, else read off the model's first quantized
        block layer ("int4", "int8") or "fp32"."""
        if self.quant is not None:
            return self.quant
        layer = next((m for m in self.model.layers.modules() if isinstance(m, QuantLinear)), None)
        return f"int{layer.bits}" if layer is not None else "fp32"

    def describe(self, name: str, quant: str | None = None) -> dict:
        """What a server advertises about this model (the fields of the protocol's ModelInfo):
        sizes for the hub's cost model (stored weight bytes, so the hub knows a 4-bit model reads
        an eighth of an fp32 one), the config itself, and whether it takes chat messages. `quant`
        defaults to the loader's `quant`, else to what the model holds: "int4", "int8" or "fp32"."""
        quant = quant or self.served_quant
        return {
            "name": name,
            "arch": self.config.arch,
            "n_layers": self.config.n_layers,
            "quant": quant,
            "weight_bytes": weight_bytes(self.model),
            "config_json": json.dumps(dataclasses.asdict(self.config)),
            "chat": self.tokenizer.info.chat_template is not None,
            "tools": takes_tools(self.tokenizer.info.chat_template),
            "chat_template_tokens": self._template_tokens(),
        }

    def _template_tokens(self) -> int:
        """Tokens the chat template adds around one empty user message (its system prompt, role
        markers): what a chat prompt costs beyond its text, for the hub's routing. 0 without one."""
        if self.tokenizer.info.chat_template is None:
            return 0
        return len(self.generator().encode_prompt([{"role": "user", "content": ""}]))
