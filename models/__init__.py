"""The model zoo: architecture specs, deterministic synthetic checkpoints in every load
format, a local cache of them, and resolution of model references (zoo names, local files,
Hugging Face hub ids) to files on disk; LoRA and textual-inversion files per architecture.
Multi-stage models (Kandinsky 2.2, DeepFloyd IF) are :mod:`models.staged`'s."""

from .controlnet import CONTROLNETS, DEFAULT_CONTROLNET
from .convert import (
    SPEC_METADATA_KEY,
    read_spec_metadata,
    to_original_state_dict,
    write_config_folder,
    write_hub_folder,
    write_single_file,
)
from .embeddings import EMBEDDINGS, read_embedding
from .extras import controlnet_config_folder, extra_file, extra_names, model_spec
from .lora import (
    LORAS,
    LoraLayer,
    LoraTarget,
    file_network_type,
    lora_targets,
    merge_loras,
    network_type,
    read_lora,
)
from .sources import ResolvedModel, fetch, resolve, single_file_spec
from .specs import SPECS, ModelSpec, base_spec, get_spec
from .staged import STAGED_SPECS, StagedSpec
from .synth import Components, parameter_counts, synthesize
from .tokenizer import write_tokenizer
from .zoo import (
    FORMATS,
    cache_root,
    config_folder,
    install_in_hf_cache,
    list_models,
    materialize,
    materialize_formats,
    model_dir,
    write_model,
)

__all__ = [
    "CONTROLNETS",
    "DEFAULT_CONTROLNET",
    "EMBEDDINGS",
    "FORMATS",
    "LORAS",
    "SPECS",
    "STAGED_SPECS",
    "StagedSpec",
    "SPEC_METADATA_KEY",
    "Components",
    "LoraLayer",
    "LoraTarget",
    "ModelSpec",
    "ResolvedModel",
    "base_spec",
    "cache_root",
    "config_folder",
    "controlnet_config_folder",
    "extra_file",
    "extra_names",
    "get_spec",
    "install_in_hf_cache",
    "list_models",
    "file_network_type",
    "lora_targets",
    "network_type",
    "materialize",
    "materialize_formats",
    "merge_loras",
    "model_spec",
    "model_dir",
    "parameter_counts",
    "read_embedding",
    "read_lora",
    "read_spec_metadata",
    "fetch",
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
