"""`from_pretrained` loads an actsparse directory sparse: a transformers quantizer.

A directory saved by `actsparse.save` declares ``quantization_config: {"quant_method": "actsparse",
...}`` in its config.json. Importing actsparse registers this quantizer with transformers' own
extension point (`register_quantization_config` / `register_quantizer`), so that
``AutoModelForCausalLM.from_pretrained(DIR)`` checks the directory before reading any weight, loads
the plain weights, then swaps in the sparse modules and loads the sparsity state: the same steps, in
the same order, as `actsparse.load`, so the logits are identical.

The modules are swapped after the weights are loaded, not on the meta-device skeleton before: the
saved weights are a plain Hugging Face checkpoint whose names are those of the dense model (a
LaRoSA rotation wraps its norm), so the dense skeleton is what they load into.

config.json's `model_type` is "actsparse" (the architecture's own is `quantization_config`'s
`base_model_type`): without actsparse imported, transformers refuses the directory as a model
type it does not recognize, where an unknown quantization method alone would only be logged and
the model loaded dense. Importing actsparse registers that model type with `AutoConfig`, whose
config is the base architecture's own config class.
"""
from __future__ import annotations

from pathlib import Path

from transformers import CONFIG_MAPPING, AutoConfig, PretrainedConfig
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.utils import logging
from transformers.utils.quantization_config import QuantizationConfigMixin

from .errors import ActSparseError
from .io import (FORMAT_VERSION, MODEL_TYPE, QUANT_METHOD, STATE_FILE, _hf_state_dict, _state_tensors,
                 is_saving_through_actsparse, read_meta, restore_sparse_)

logger = logging.get_logger(__name__)


@register_quantization_config(QUANT_METHOD)
class ActSparseQuantizationConfig(QuantizationConfigMixin):
    """config.json's `quantization_config` of a saved directory: format version, method, state file and
    the architecture's own model type."""

    def __init__(self, format_version: int | None = None, method: str | None = None, state: str | None = None,
                 base_model_type: str | None = None, **kwargs) -> None:
        self.quant_method = QUANT_METHOD
        self.format_version = format_version
        self.method = method
        self.state = state
        self.base_model_type = base_model_type


class ActSparseModelConfig(PretrainedConfig):
    """The `actsparse` model type of a saved directory's config.json: `from_dict` builds the config of
    the architecture named by `quantization_config.base_model_type`, so that the Auto classes pick
    that architecture's model and the quantizer below makes it sparse."""

    model_type = MODEL_TYPE

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs):
        quantization = config_dict.get("quantization_config")
        base = quantization.get("base_model_type") if isinstance(quantization, dict) else None
        if not isinstance(base, str) or base == MODEL_TYPE or base not in CONFIG_MAPPING:
            raise ActSparseError(f"a config of model_type {MODEL_TYPE!r} needs quantization_config.base_model_type "
                                 f"naming an architecture transformers knows, got {base!r}")
        return CONFIG_MAPPING[base].from_dict({**config_dict, "model_type": base}, **kwargs)


AutoConfig.register(MODEL_TYPE, ActSparseModelConfig)


@register_quantizer(QUANT_METHOD)
class ActSparseHfQuantizer(HfQuantizer):
    requires_calibration = True  # only a directory saved by actsparse.save, never a dense model

    def __init__(self, quantization_config: ActSparseQuantizationConfig, **kwargs) -> None:
        super().__init__(quantization_config, **kwargs)
        self.directory: Path | None = None
        self.meta: dict | None = None

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        """Check the directory and its recipe before any weight is read."""
        if not checkpoint_files:
            raise ActSparseError("an actsparse model loads only from a local directory saved by actsparse.save")
        self.directory = Path(checkpoint_files[0]).parent
        q = self.quantization_config
        where = self.directory / "config.json"
        if q.format_version != FORMAT_VERSION:
            raise ActSparseError(f"{where}: actsparse format version {q.format_version!r} is not supported "
                                 f"(this actsparse reads version {FORMAT_VERSION})")
        if q.state != STATE_FILE:
            raise ActSparseError(f"{where}: quantization_config's state is {q.state!r}, expected {STATE_FILE!r}")
        self.meta = read_meta(self.directory)
        saved_method = self.meta["config"].get("method")
        if q.method != saved_method:
            raise ActSparseError(f"{where}: quantization_config names method {q.method!r} but {STATE_FILE} holds "
                                 f"{saved_method!r}")
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        restore_sparse_(model, self.directory, self.meta)
        return model

    def get_state_dict_and_metadata(self, model):
        """The plain weights: the sparsity state goes to its own file, written by actsparse.save."""
        return _hf_state_dict(model, _state_tensors(model)), {}

    def is_serializable(self, *args, **kwargs) -> bool:
        if is_saving_through_actsparse():
            return True
        logger.warning("an actsparse model is saved with actsparse.save(model, DIR): save_pretrained alone "
                       "cannot write its sparsity state")
        return False

    @property
    def is_trainable(self) -> bool:
        return False
