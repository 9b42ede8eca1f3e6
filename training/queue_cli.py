"""``python -m training.queue_cli``, as the shipped workflows' notes write it: the API-queue CLI is
``tools.queue_cli`` (training/ holds only what runs as a trainer)."""

from tools.queue_cli import main

if __name__ == "__main__":
    raise SystemExit(main())
