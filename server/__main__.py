"""``python -m server``: the HTTP front end under uvicorn.

python -m server                                  # every model in model_repository/
python -m server --models vgg16 --scales 256,384 --port 9000
python -m server --backend triton --triton-url 127.0.0.1:8001
"""

from __future__ import annotations

import logging
import sys

from inference import OptionError, RepositoryError
from server.engine import StartupError
from server.flags import parse_settings
from server.heap import fix_mmap_threshold

# Request line + headers of one request; browsers send a few KB, cookies included.
MAX_HEADER_BYTES = 64 * 1024


def main(argv: list[str] | None = None) -> int:
    """Start the server; a start that cannot work exits non-zero with one line on stderr."""
    settings = parse_settings(argv)
    logging.basicConfig(level=settings.log_level.upper(), format="%(levelname)s:     %(message)s")
    fix_mmap_threshold()  # before any image buffer is allocated
    try:
        from server.main import create_app

        app = create_app(settings)
    except RepositoryError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OptionError as exc:
        print(f"error: --{exc}", file=sys.stderr)
        return 2
    except StartupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    import uvicorn

    from server.connections import protocol_class, raise_file_limit

    raise_file_limit(settings.max_connections)

    # On SIGTERM uvicorn stops accepting at once and waits for in-flight requests; after the
    # grace period it cancels what is left and exits. h11, not httptools: httptools buffers
    # request headers without any limit (300 MB of one header took 300 MB of RSS), h11 answers
    # 400 beyond MAX_HEADER_BYTES. Its protocol is extended with a lingering close after early
    # answers, --client-timeout and --max-connections (server/connections.py).
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=False,  # server.request_id logs each request, with its id and duration
        timeout_graceful_shutdown=settings.grace_period,
        http=protocol_class(settings.client_timeout, settings.max_connections),
        h11_max_incomplete_event_size=MAX_HEADER_BYTES,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
