"""Native MiniCPM-V (2.6, 4.0, 4.5). Importing this package registers the model with transformers' Auto classes,
so `AutoModel.from_pretrained(official_dir)` builds `MiniCPMV` without `trust_remote_code`."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM
from transformers.conversion_mapping import register_checkpoint_conversion_mapping

from .checkpoint_names import transformers_conversions
from .configuration import MiniCPMVConfig
from .modeling import MiniCPMV, MiniCPMVPreTrainedModel
from .versions import VERSIONS, VersionSpec, version_spec

AutoConfig.register(MiniCPMVConfig.model_type, MiniCPMVConfig, exist_ok=True)
AutoModel.register(MiniCPMVConfig, MiniCPMV, exist_ok=True)
AutoModelForCausalLM.register(MiniCPMVConfig, MiniCPMV, exist_ok=True)
register_checkpoint_conversion_mapping(MiniCPMVConfig.model_type, transformers_conversions(), overwrite=True)

__all__ = ["VERSIONS", "MiniCPMV", "MiniCPMVConfig", "MiniCPMVPreTrainedModel", "VersionSpec", "version_spec"]
