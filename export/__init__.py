"""Export trained VGG weights into a Triton model repository (ONNX).

:func:`export.exporter.export_model` is the library function; ``python -m export`` and
``python export/to_onnx.py`` are the command over it.
"""
