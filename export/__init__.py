"""Export trained VGG weights into a Triton model repository (ONNX)."""
