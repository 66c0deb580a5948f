"""``python -m router``: one router replica (see router/server.py)."""

from router.server import main

main()
