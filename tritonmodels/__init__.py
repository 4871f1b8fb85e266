"""Python code that Triton itself runs: the ``classify`` model (:mod:`tritonmodels.classify`).

Imported only inside Triton's Python-backend stub (it needs ``triton_python_backend_utils``).
"""
