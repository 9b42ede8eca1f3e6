"""Tools around the pack that do not run inside ComfyUI or in a trainer child: the API-queue client and CLI,
the UI→API workflow converter, the thumbnail renderer, the demo and the tiny-model kit. Run them from the
repository root as ``python -m tools.<name>``."""
