"""The model zoo: architecture specs, deterministic synthetic checkpoints in every load
format, a local cache of them, and resolution of model references (zoo names, local files,
Hugging Face hub ids) to files on disk."""

from .convert import (
    SPEC_METADATA_KEY,
    read_spec_metadata,
    to_original_state_dict,
    write_config_folder,
    write_hub_folder,
    write_single_file,
)
from .sources import ResolvedModel, resolve, single_file_spec
from .specs import SPECS, ModelSpec, get_spec
from .synth import Components, parameter_counts, synthesize
from .tokenizer import write_tokenizer
from .zoo import (
    FORMATS,
    cache_root,
    config_folder,
    install_in_hf_cache,
    list_models,
    materialize,
    model_dir,
    write_model,
)

__all__ = [
    "FORMATS",
    "SPECS",
    "SPEC_METADATA_KEY",
    "Components",
    "ModelSpec",
    "ResolvedModel",
    "cache_root",
    "config_folder",
    "get_spec",
    "install_in_hf_cache",
    "list_models",
    "materialize",
    "model_dir",
    "parameter_counts",
    "read_spec_metadata",
    "resolve",
    "single_file_spec",
    "synthesize",
    "to_original_state_dict",
    "write_config_folder",
    "write_hub_folder",
    "write_model",
    "write_single_file",
    "write_tokenizer",
]
