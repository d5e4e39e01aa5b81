"""The model: resolve a name or path, convert Hugging Face directories to ONNX, read graphs, validate inputs."""
