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


def captioned_review_prompt(character: str, source: str, token: str = "ohwx_char person", colors=COLORS,
                            run_id: str = "", max_new_tokens: int = 8) -> dict:
    """As review_prompt, with FLEN Caption Images between the images and the queue: each candidate arrives with
    the tiny Qwen2.5-VL's caption in its meta, which the gallery shows and the reviewer may edit."""
    prompt = review_prompt(character, colors, run_id)
    images = prompt["queue"]["inputs"]["images"]
    prompt["cap"] = {"class_type": "FLENCaptionImages",
                     "inputs": {"images": images, "source": source, "instance_token": token,
                                "max_new_tokens": max_new_tokens, "max_pixels": 128 * 128}}
    prompt["queue"]["inputs"]["meta"] = ["cap", 1]
    return prompt
