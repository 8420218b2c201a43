"""Images sent with a question for a vision model (docs/api.md "Images"): checked and normalised at the edge.

Both APIs end up with bare base64 per image (``ChatMessage.images`` on the wire): Ollama's ``images`` are that
already; OpenAI's ``image_url`` content parts are ``data:`` URLs — a remote URL is refused, because fetching
it makes the cluster a client of whatever address a caller names, unless ``--allow-remote-images`` says the app
may fetch it (:func:`fetched_images`: the app, never an agent, with a short timeout, the same size limit, image
types only, and public addresses only unless ``--allow-local-image-urls``). A job is one MQTT message (1 MiB), so
an image may be at most :data:`MAX_IMAGE_BYTES` and a question's images together :data:`MAX_TOTAL_IMAGE_BYTES`
(decoded); over that is a 413 naming the limit.

The chat UI attaches a file (:func:`attachment_from_file`): the same limits, image types recognised by their
first bytes, and the chat stores a note of it (:meth:`ImageAttachment.note`), not the image.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import ipaddress
import logging
import re
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

import httpx

from app.api_common import ApiError
from app.errors import BadRequest
from broker.scheduling.catalog import VISION_NAME_HINTS, VISION_TAG
from broker.scheduling.names import model_key

logger = logging.getLogger(__name__)

MAX_IMAGE_BYTES = 512 * 1024
MAX_TOTAL_IMAGE_BYTES = 640 * 1024
"""Decoded bytes; as base64 that is about 853 KB of the 1 MiB a job may take, leaving room for the text."""
MAX_IMAGES = 8
DATA_URL = re.compile(r"^data:(image/[A-Za-z0-9.+-]+)?(;[^,]*)?;base64,(.*)$", re.DOTALL)
REMOTE_TIMEOUT_S = 5.0
"""The whole fetch of one remote image (every redirect included): a slow server must not hold a question long."""
MAX_REDIRECTS = 3
SIGNATURES = {
    "image/png": (b"\x89PNG\r\n\x1a\n",),
    "image/jpeg": (b"\xff\xd8\xff",),
    "image/gif": (b"GIF87a", b"GIF89a"),
    "image/webp": (b"RIFF",),  # and "WEBP" at byte 8 (checked below)
}
"""The raster formats vision runtimes read (Ollama, llama.cpp), known by their first bytes, not by a file name."""
UPLOAD_SUFFIXES = [".png", ".jpg", ".jpeg", ".gif", ".webp"]
"""What the chat's file picker offers (the bytes decide; a renamed file is still refused)."""


def checked_image(value: Any, param: str) -> tuple[str, int]:
    """Bare base64 of one image (a data: URL's prefix dropped) and its decoded size; a clear 400/413 otherwise."""
    if not isinstance(value, str) or not value:
        raise BadRequest(f"{param} must be a base64 string", param=param)
    match = DATA_URL.match(value)
    data = match.group(3) if match else value
    if value.startswith(("http://", "https://")):
        raise BadRequest(f"{param} is a remote URL ({value[:80]}); the cluster does not fetch images (unless "
                         "started with --allow-remote-images): send the image itself as a data: URL "
                         "(data:image/png;base64,...)", param=param)
    data = "".join(data.split())
    try:
        decoded = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest(f"{param} is not valid base64 image data", param=param) from None
    size = len(decoded)
    if size > MAX_IMAGE_BYTES:
        raise ApiError(413, f"{param} is {size:,} bytes; an image may be at most {MAX_IMAGE_BYTES:,} bytes (it "
                            "travels inside one 1 MiB cluster message): send a smaller image", "image_too_large",
                       param=param)
    if image_type(decoded) is None:  # a runtime would refuse it anyway, after routing and a model load
        raise BadRequest(f"{param} is not a PNG, JPEG, GIF or WebP image", param=param)
    return data, size


def checked_images(groups: list[list[Any]], param: str) -> list[list[str]]:
    """Each message's images checked, and their count and total size bounded across the whole question."""
    found: list[list[str]] = []
    total = count = 0
    for index, images in enumerate(groups):
        kept = []
        for position, image in enumerate(images):
            data, size = checked_image(image, f"{param}[{index}].images[{position}]" if len(groups) > 1
                                       else f"{param}[{position}]")
            kept.append(data)
            total += size
            count += 1
        found.append(kept)
    if count > MAX_IMAGES:
        raise BadRequest(f"{count} images in one question; the limit is {MAX_IMAGES}", param=param)
    if total > MAX_TOTAL_IMAGE_BYTES:
        raise ApiError(413, f"the images of this question are {total:,} bytes together; the limit is "
                            f"{MAX_TOTAL_IMAGE_BYTES:,} (one 1 MiB cluster message carries them)", "images_too_large",
                       param=param)
    return found


def openai_part_image(part: Any, param: str) -> str:
    """The data of an ``image_url`` content part (``{"url": "data:..."}`` or a bare URL string)."""
    source = part.get("url") if isinstance(part, dict) else part
    if not isinstance(source, str):
        raise BadRequest(f"{param}.image_url needs a url", param=param)
    if not source.startswith("data:"):
        if source.startswith(("http://", "https://")):
            return source  # fetched by fetched_images when --allow-remote-images, else refused by checked_image
        raise BadRequest(f"{param}.image_url must be a data: URL", param=param)
    return source


def image_type(data: bytes) -> str | None:
    """The media type of a PNG, JPEG, GIF or WebP image from its first bytes; None for anything else."""
    for media_type, starts in SIGNATURES.items():
        if data.startswith(starts) and (media_type != "image/webp" or data[8:12] == b"WEBP"):
            return media_type
    return None


def size_text(size: int) -> str:
    return f"{size / 1024:.0f} KB" if size >= 1024 else f"{size} bytes"


@dataclass(frozen=True)
class ImageAttachment:
    """An image attached in the chat UI: its base64 for the question, and what the chat keeps of it."""

    name: str
    media_type: str
    size: int
    data: str
    """Bare base64, as ``ChatMessage.images`` carries it."""

    def note(self) -> str:
        """What the stored question shows: the image itself is not kept (docs/web.md "Images")."""
        return f"[image attached: {self.name}, {size_text(self.size)}]"

    def stored(self) -> dict[str, Any]:
        """The note's fields, kept with the stored question (its ``stats["attachments"]``)."""
        return {"name": self.name, "type": self.media_type, "bytes": self.size}


def attachment_from_file(path: str | Path, name: str | None = None) -> ImageAttachment:
    """A file picked in the chat as an attachment; too large or not an image is refused with a clear message."""
    file = Path(path)
    shown = (name or file.name)[:120]
    size = file.stat().st_size
    if size > MAX_IMAGE_BYTES:
        raise ApiError(413, f"{shown} is {size_text(size)}; an image may be at most {size_text(MAX_IMAGE_BYTES)} "
                            "(it travels inside one 1 MiB cluster message): attach a smaller image",
                       "image_too_large")
    data = file.read_bytes()
    media_type = image_type(data)
    if media_type is None:
        raise BadRequest(f"{shown} is not a PNG, JPEG, GIF or WebP image")
    return ImageAttachment(shown, media_type, len(data), base64.b64encode(data).decode("ascii"))


def listed_has_vision(name: str, tags: Sequence[str] | None, in_catalog: bool) -> bool:
    """The catalog's rule (``Catalog.has_vision``) on what the app's model list knows: the ``vision`` tag for a
    catalog model, else a vision name (llava, …)."""
    if in_catalog:
        return VISION_TAG in (tags or ())
    key = model_key(name)
    return any(hint in key for hint in VISION_NAME_HINTS)


def vision_models(models: Sequence[Any]) -> list[str]:
    """The names of the listed models (``app.model_list.ListedModel``) that take images and can answer now."""
    found = []
    for model in models:
        info = getattr(model, "info", None)
        if not model.agents or (info is not None and info.embedding):
            continue
        if listed_has_vision(model.name, info.tags if info else None, bool(info and info.in_catalog)):
            found.append(model.name)
    return found


# ---------------------------------------------------------------------- remote images (--allow-remote-images)


async def fetched_images(groups: list[list[str]], *, allow_remote: bool, allow_local: bool,
                         param: str = "messages") -> list[list[str]]:
    """Each message's images with every http(s) URL replaced by the image it names, fetched by the app.

    Without ``allow_remote`` the URLs stay, and :func:`checked_image` refuses them with a 400 saying so.
    """
    if not allow_remote or not any(_remote(image) for images in groups for image in images):
        return groups
    found: list[list[str]] = []
    for index, images in enumerate(groups):
        kept = []
        for position, image in enumerate(images):
            where = f"{param}[{index}].image_url" if len(groups) > 1 else f"{param}[{position}]"
            kept.append(await fetch_image(image, allow_local=allow_local, param=where) if _remote(image) else image)
        found.append(kept)
    return found


def _remote(value: Any) -> bool:
    return isinstance(value, str) and value.startswith(("http://", "https://"))


def _public(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


async def _pinned_address(host: str, port: int, allow_local: bool, param: str) -> str:
    """One address of ``host`` to connect to; every address it resolves to must be public (unless local fetches
    are allowed), so a name cannot point the app at the machine itself or the LAN."""
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as error:
        raise BadRequest(f"{param}: the image's host {host!r} could not be resolved ({error})", param=param) from None
    addresses = list(dict.fromkeys(info[4][0] for info in infos))
    if not addresses:
        raise BadRequest(f"{param}: the image's host {host!r} has no address", param=param)
    if not allow_local:
        private = [address for address in addresses if not _public(address)]
        if private:
            raise BadRequest(f"{param}: the image's host {host!r} is a private, loopback or local address "
                             f"({private[0]}); the app fetches images only from public addresses "
                             "(--allow-local-image-urls allows local ones)", param=param)
    return addresses[0]


async def fetch_image(url: str, *, allow_local: bool, param: str, timeout_s: float = REMOTE_TIMEOUT_S) -> str:
    """The base64 of the image at ``url``, fetched by the app (redirects followed and checked, at most
    :data:`MAX_IMAGE_BYTES`, an image type by its header and its bytes); a clear 400/413 otherwise."""
    try:
        async with asyncio.timeout(timeout_s):
            return await _fetch(url, allow_local, param)
    except TimeoutError:
        raise BadRequest(f"{param}: fetching the image at {url[:80]} took over {timeout_s:g} s", param=param) from None
    except httpx.HTTPError as error:
        raise BadRequest(f"{param}: the image at {url[:80]} could not be fetched ({type(error).__name__})",
                         param=param) from None


async def _fetch(url: str, allow_local: bool, param: str) -> str:
    # trust_env off: a proxy from the environment would connect elsewhere than the address checked here.
    async with httpx.AsyncClient(follow_redirects=False, trust_env=False) as client:
        for _ in range(MAX_REDIRECTS + 1):
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise BadRequest(f"{param}: {url[:80]} is not an http(s) URL", param=param)
            port = parts.port or (443 if parts.scheme == "https" else 80)
            address = await _pinned_address(parts.hostname, port, allow_local, param)
            # Connect to the checked address itself (no second lookup a DNS answer could change), with the name
            # as Host and for TLS (SNI and certificate check).
            shown = f"[{address}]" if ":" in address else address
            target = parts._replace(netloc=f"{shown}:{port}").geturl()
            request = client.build_request("GET", target, headers={"Host": parts.netloc.rsplit("@", 1)[-1],
                                                                    "Accept": "image/*"},
                                           extensions={"sni_hostname": parts.hostname})
            response = await client.send(request, stream=True)
            try:
                if response.is_redirect and "location" in response.headers:
                    url = urljoin(url, response.headers["location"])
                    continue
                return await _image_body(response, url, param)
            finally:
                await response.aclose()
        raise BadRequest(f"{param}: the image URL redirects more than {MAX_REDIRECTS} times", param=param)


async def _image_body(response: httpx.Response, url: str, param: str) -> str:
    if response.status_code != 200:
        raise BadRequest(f"{param}: the image at {url[:80]} answered HTTP {response.status_code}", param=param)
    media_type = response.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media_type not in SIGNATURES:
        raise BadRequest(f"{param}: {url[:80]} is {media_type or 'of no stated type'}, not a PNG, JPEG, GIF or "
                         "WebP image", param=param)
    declared = response.headers.get("content-length")
    too_large = ApiError(413, f"{param}: the image at {url[:80]} is over {MAX_IMAGE_BYTES:,} bytes, the most an "
                              "image may be", "image_too_large", param=param)
    if declared and declared.isdigit() and int(declared) > MAX_IMAGE_BYTES:
        raise too_large
    body = bytearray()
    async for chunk in response.aiter_bytes():
        body += chunk
        if len(body) > MAX_IMAGE_BYTES:
            raise too_large
    if image_type(bytes(body)) is None:
        raise BadRequest(f"{param}: {url[:80]} says {media_type} but its bytes are not a PNG, JPEG, GIF or WebP "
                         "image", param=param)
    logger.info("fetched a %d-byte image for a question", len(body))
    return base64.b64encode(bytes(body)).decode("ascii")
