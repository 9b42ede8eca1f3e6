"""FLENwheel engines: plain, typed Python that imports nothing from ComfyUI.

Nodes (in ``nodes/``) validate inputs, call these and shape outputs; everything that touches
ComfyUI goes through ``nodes/comfy_bridge.py``.
"""
