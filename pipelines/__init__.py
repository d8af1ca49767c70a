"""Plug-ins for diffusers pipelines. `import pipelines.tlora` adds T-LoRA support to the SD-XL pipelines."""
