"""Images for vision models in each runtime's dialect (docs/api.md "Images").

The wire carries an image as bare base64 (``ChatMessage.images``). Ollama takes that list as is beside the text;
an OpenAI-compatible runtime takes content parts with a ``data:`` URL, whose media type is read from the image's
first bytes (PNG, JPEG, GIF, WebP; anything else is sent as ``image/png``, which such servers decode by content).
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

SIGNATURES = ((b"\x89PNG", "image/png"), (b"\xff\xd8\xff", "image/jpeg"), (b"GIF8", "image/gif"),
              (b"RIFF", "image/webp"))


def media_type(image: str) -> str:
    """The image's media type from its first bytes (base64 of them), ``image/png`` when unknown."""
    try:
        head = base64.b64decode(image[:24] + "=" * (-len(image[:24]) % 4), validate=False)
    except (binascii.Error, ValueError):
        return "image/png"
    return next((kind for magic, kind in SIGNATURES if head.startswith(magic)), "image/png")


def openai_content(text: str, images: list[str] | tuple[str, ...]) -> list[dict[str, Any]]:
    """OpenAI content parts: the text, then each image as a data URL."""
    parts: list[dict[str, Any]] = [{"type": "text", "text": text}] if text else []
    parts += [{"type": "image_url", "image_url": {"url": f"data:{media_type(image)};base64,{image}"}}
              for image in images]
    return parts
