"""``python -m worker_core``: the worker-core command."""

from .cli import main

raise SystemExit(main())
