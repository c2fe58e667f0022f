"""An sdbench backend plugin: diffusers' Stable Diffusion pipeline with a user's patch.

The patch is :class:`~sdbench_example_backend.attention.ChunkedAttnProcessor`, attention
computed over chunks of the query sequence (what apps do to cap the attention matrix's memory
at high resolutions). The backend is registered as ``chunked-attention`` through the
``sdbench.backends`` entry point in this package's ``pyproject.toml``.
"""
