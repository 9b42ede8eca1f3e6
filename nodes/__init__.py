"""ComfyUI nodes of FLENwheel: thin wrappers that validate inputs and call the engines."""

from comfy_api.v0_0_2 import ComfyExtension, io

from . import flux_nodes, identity_nodes, lora_stack_nodes, qwen_nodes, review_gate, review_nodes, save_nodes
from .ai_toolkit_nodes import NODES as AI_TOOLKIT_NODES
from .caption_nodes import NODES as CAPTION_NODES
from .dataset_nodes import NODES as DATASET_NODES
from .model_card_nodes import NODES as MODEL_CARD_NODES
from .routes import register_routes
from .training_nodes import NODES as TRAINING_NODES

NODES: list[type[io.ComfyNode]] = [*lora_stack_nodes.NODES, *flux_nodes.NODES, *identity_nodes.NODES,
                                   *qwen_nodes.NODES, *review_nodes.NODES,
                                   *save_nodes.NODES, *review_gate.NODES]
NODES += DATASET_NODES
NODES += MODEL_CARD_NODES
NODES += TRAINING_NODES
NODES += AI_TOOLKIT_NODES
NODES += CAPTION_NODES


class FlenwheelExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        # ComfyUI 0.3.64 never calls on_load; this runs once, after PromptServer exists.
        register_routes()
        clean_after_crash()
        return NODES


def clean_after_crash() -> None:
    """A server crash leaves launcher_child.json (and maybe a trainer) behind; the next start tidies up."""
    import logging

    from . import comfy_bridge
    from .training_nodes import clean_stale_children

    try:
        for line in clean_stale_children(comfy_bridge.output_directory()):
            logging.getLogger("FLENwheel").warning("FLENwheel: %s", line)
    except Exception:  # tidying must never stop the pack from loading
        logging.getLogger("FLENwheel").exception("FLENwheel: cleaning up after a crash failed")
