"""FLENwheel: character LoRAs for FLUX with a human in the loop (ComfyUI custom-node pack)."""

from .nodes import FlenwheelExtension

WEB_DIRECTORY = "web"


async def comfy_entrypoint() -> FlenwheelExtension:
    return FlenwheelExtension()


__all__ = ["WEB_DIRECTORY", "comfy_entrypoint"]
