"""LoRA cards over HTTP (`booth.generate.cards`): what the web UI's LoRA panel lists, shows and edits.

* `GET  /booth/v1/loras[?search=TEXT]` -> `{"loras": [card, ...]}`: name, alias, path, sd_version, description,
  activation_text, preferred_weight, negative_text, notes, tags ([tag, count], most frequent first), prompt and
  negative_prompt (what a click inserts; the default weight is the option `extra_networks_default_multiplier`),
  preview_url (null without a preview), problem (a side file that could not be read).
* `GET  /booth/v1/loras/{name}` -> the card with its `hash` (A1111's LoRA shorthash).
* `GET  /booth/v1/loras/{name}/preview` -> the preview picture (its file, else the file's embedded cover).
* `POST /booth/v1/loras/{name}` `{"activation_text": ..., "preferred_weight": ..., "negative_text": ...,
  "notes": ..., "description": ..., "sd_version": ..., "preview": base64 picture}` (every field optional) ->
  the card, after the fields are written to `<stem>.json` (A1111's keys, other keys kept) and the picture to
  `<stem>.png`.

`{name}` is a LoRA name or unique alias, looked up in the server's LoRA folders (never a path); an unknown name
is a 404, a bad field a 422, both A1111-style JSON errors.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from fastapi import APIRouter, Query
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict

from booth.errors import BoothError
from booth.server.errors import ApiError


class CardEdit(BaseModel):
    model_config = ConfigDict(extra="forbid")

    description: str | None = None
    sd_version: str | None = None
    activation_text: str | None = None
    preferred_weight: float | None = None
    negative_text: str | None = None
    notes: str | None = None
    preview: str | None = None


def build_router(services) -> APIRouter:
    router = APIRouter(prefix="/booth/v1")

    def network():
        from booth.generate.networks import LoraNetwork

        return LoraNetwork(services.config.lora_dirs)

    def default_weight() -> float:
        return float(services.current_options()["extra_networks_default_multiplier"])

    def public(card, with_hash: bool = False) -> dict[str, Any]:
        entry = card.to_dict(default_weight())
        has_preview = entry.pop("preview")
        entry["preview_url"] = f"/booth/v1/loras/{quote(card.name, safe='')}/preview" if has_preview else None
        if with_hash:
            from booth.models.hashing import lora_shorthash

            entry["hash"] = lora_shorthash(card.path)
        return entry

    def find_card(name: str):
        from booth.generate.cards import find_card

        try:
            return find_card(network(), name)
        except BoothError as exc:
            raise ApiError(404, str(exc)) from None

    @router.get("/loras")
    async def list_loras(search: str | None = Query(None, max_length=200)):
        from booth.generate.cards import lora_cards

        cards = await run_in_threadpool(lora_cards, network(), search)
        return {"loras": [public(card) for card in cards]}

    @router.get("/loras/{name}")
    async def get_lora(name: str):
        card = await run_in_threadpool(find_card, name)
        return await run_in_threadpool(public, card, True)

    @router.get("/loras/{name}/preview")
    async def preview(name: str):
        from booth.generate.cards import preview_bytes

        card = await run_in_threadpool(find_card, name)
        found = await run_in_threadpool(preview_bytes, card)
        if found is None:
            raise ApiError(404, f"LoRA {name!r} has no preview")
        data, media = found
        return Response(data, media_type=media, headers={"Cache-Control": "no-cache"})

    @router.post("/loras/{name}")
    async def edit_lora(name: str, req: CardEdit):
        from booth.generate.cards import FIELD_NAMES, check_user_metadata, save_preview, write_user_metadata
        from booth.server.security import decode_image

        edits = req.model_dump(exclude_none=True)
        changes = {key: edits[name] for name, key in FIELD_NAMES.items() if name in edits}
        try:
            check_user_metadata(changes)
        except BoothError as exc:
            raise ApiError(422, str(exc), error="RequestValidationError") from None
        image = decode_image(req.preview, services.config.limits, "preview") if req.preview else None
        card = await run_in_threadpool(find_card, name)

        def write():
            if changes:
                write_user_metadata(card.path, changes)
            if image is not None:
                save_preview(card.path, image)
            return public(find_card(name), True)

        return await run_in_threadpool(write)

    return router


__all__ = ["build_router"]
