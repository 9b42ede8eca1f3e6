"""Prompt builders shared by the review and dataset server tests."""

COLORS = [0xFF0000, 0x00FF00, 0x0000FF, 0xFFFF00]


def review_prompt(character: str, colors=COLORS, run_id: str = "", size: int = 32) -> dict:
    """EmptyImage per color → ImageBatch chain → FLENReviewQueue (with the first as source)."""
    prompt: dict = {}
    for k, color in enumerate(colors):
        prompt[f"img{k}"] = {"class_type": "EmptyImage",
                             "inputs": {"width": size, "height": size, "batch_size": 1, "color": color}}
    last = ["img0", 0]
    for k in range(1, len(colors)):
        prompt[f"batch{k}"] = {"class_type": "ImageBatch", "inputs": {"image1": last, "image2": [f"img{k}", 0]}}
        last = [f"batch{k}", 0]
    prompt["queue"] = {"class_type": "FLENReviewQueue",
                       "inputs": {"images": last, "character": character, "run_id": run_id, "version": "v1",
                                  "source_images": ["img0", 0]}}
    return prompt
