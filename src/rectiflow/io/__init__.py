"""rectiflow.io: the lowest layer for files: atomic writes (io.atomic) and the one safetensors reader /
writer of the project (io.safetensors_io: validated headers, streamed reads, atomic writes, no pickle)."""
