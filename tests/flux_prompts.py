"""Prompt parts shared by the launcher server tests."""


def add_lora_driven_generation(prompt: dict, lora_name_link: list, prefix: str) -> dict:
    """Adds FLENLoraStack (its lora_name linked to a launcher's output) → FLENFluxGenerate on the tiny FLUX →
    SaveImage, so the new LoRA is loaded and used in the same prompt."""
    prompt["stack"] = {"class_type": "FLENLoraStack",
                       "inputs": {"lora_name": lora_name_link, "strength": 1.0, "enabled": True}}
    prompt["loader"] = {"class_type": "FLENFluxLoader", "inputs": {"model": "flen-tiny-flux", "precision": "fp32"}}
    prompt["gen"] = {"class_type": "FLENFluxGenerate",
                     "inputs": {"flux_pipe": ["loader", 0], "prompts": "a photo of ohwx_char person", "width": 64,
                                "height": 64, "steps": 1, "guidance": 3.5, "seed": 1, "batch": 1,
                                "lora_stack": ["stack", 0]}}
    prompt["save"] = {"class_type": "SaveImage", "inputs": {"images": ["gen", 0], "filename_prefix": prefix}}
    return prompt
