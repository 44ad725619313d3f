//! safetensors in (validated, memory-mapped) and out (streamed, atomic). PLACEHOLDER.
