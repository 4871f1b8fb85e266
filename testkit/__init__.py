"""The toolkit that tests/, bench/ and loadtest/ share (never imported by the product).

- :mod:`testkit.ports`: free loopback ports, never handed out twice.
- :mod:`testkit.processes`: ``python -m server`` and the real tritonserver as processes, and
  their resources.
- :mod:`testkit.images`: synthetic images, the load tests' image set and the awkward files.
- :mod:`testkit.models`: the small VGG models and their repository; random-weight exports.
- :mod:`testkit.checks`: what a correct classify response looks like, its probabilities
  included.
- :mod:`testkit.expected_posteriors`: the per-view posteriors of known images, computed in
  this process, that the checks fuse for each request's plan.
- :mod:`testkit.request_mix`: the query parameters clients of the API send, drawn at random.
- :mod:`testkit.logs`: what an app running in this process logs, as text.
- :mod:`testkit.raw_http`: HTTP/1.1 over a plain socket (whole responses, and whether the
  server has read what was sent).
- :mod:`testkit.tolerances`: how far two floating-point evaluations of a VGG may differ.
- :mod:`testkit.killed_export`: ``python -m testkit.killed_export``, an export that SIGKILLs
  itself at a chosen file-system step (or at every one).

The library modules import only the standard library, numpy and Pillow when they are imported
(the GPU benchmark runs where little else is installed); PyTorch, psutil and the product's
packages are imported by the functions that need them.
"""

from pathlib import Path

# The checkout this toolkit belongs to: servers and commands run from here.
REPOSITORY_ROOT = Path(__file__).resolve().parents[1]
