"""LoRA and embedding cards over HTTP (`booth.generate.cards`): what the web UI's panels list, show and edit.

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

The same four routes under `/booth/v1/embeddings` serve the textual-inversion embeddings of the embeddings
folders (A1111's Textual Inversion tab): `{"embeddings": [...]}`, each card's prompt its trigger word, its hash
the file's sha256 (12 digits).

`{name}` is a LoRA name or unique alias, or an embedding's trigger word, looked up in the server's folders
(never a path); an unknown name is a 404, a bad field a 422, both A1111-style JSON errors.
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

    def lora_cards(search: str | None):
        from booth.generate.cards import lora_cards

        return lora_cards(network(), search)

    def lora_card(name: str):
        from booth.generate.cards import find_card

        return find_card(network(), name)

    def embedding_cards(search: str | None):
        import warnings

        from booth.generate.cards import embedding_cards

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # unreadable files are left out, as /sdapi/v1/embeddings does
            return embedding_cards(services.config.embeddings_dirs, search)

    def embedding_card(name: str):
        from booth.generate.cards import find_embedding_card

        return find_embedding_card(services.config.embeddings_dirs, name)

    _card_routes(router, services, "loras", "LoRA", lora_cards, lora_card)
    _card_routes(router, services, "embeddings", "embedding", embedding_cards, embedding_card)
    return router


def _card_routes(router: APIRouter, services, kind: str, what: str, list_cards, get_card) -> None:
    """GET /<kind>, GET /<kind>/{name}, GET /<kind>/{name}/preview, POST /<kind>/{name} over a kind of cards."""

    def default_weight() -> float:
        return float(services.current_options()["extra_networks_default_multiplier"])

    def public(card, with_hash: bool = False) -> dict[str, Any]:
        entry = card.to_dict(default_weight())
        has_preview = entry.pop("preview")
        entry["preview_url"] = (
            f"/booth/v1/{kind}/{quote(card.name, safe='')}/preview" if has_preview else None
        )
        if with_hash:
            from booth.generate.cards import card_hash

            entry["hash"] = card_hash(card)
        return entry

    def find(name: str):
        try:
            return get_card(name)
        except BoothError as exc:
            raise ApiError(404, str(exc)) from None

    async def listing(search: str | None = Query(None, max_length=200)):
        cards = await run_in_threadpool(list_cards, search)
        return {kind: [public(card) for card in cards]}

    async def detail(name: str):
        card = await run_in_threadpool(find, name)
        return await run_in_threadpool(public, card, True)

    async def preview(name: str):
        from booth.generate.cards import preview_bytes

        card = await run_in_threadpool(find, name)
        found = await run_in_threadpool(preview_bytes, card)
        if found is None:
            raise ApiError(404, f"{what} {name!r} has no preview")
        data, media = found
        return Response(data, media_type=media, headers={"Cache-Control": "no-cache"})

    async def edit(name: str, req: CardEdit):
        from booth.generate.cards import FIELD_NAMES, check_user_metadata, save_preview, write_user_metadata
        from booth.server.security import decode_image

        edits = req.model_dump(exclude_none=True)
        changes = {key: edits[field] for field, key in FIELD_NAMES.items() if field in edits}
        try:
            check_user_metadata(changes)
        except BoothError as exc:
            raise ApiError(422, str(exc), error="RequestValidationError") from None
        image = decode_image(req.preview, services.config.limits, "preview") if req.preview else None
        card = await run_in_threadpool(find, name)

        def write():
            if changes:
                write_user_metadata(card.path, changes)
            if image is not None:
                save_preview(card.path, image)
            return public(find(name), True)

        return await run_in_threadpool(write)

    router.add_api_route(f"/{kind}", listing, methods=["GET"])
    router.add_api_route(f"/{kind}/{{name}}", detail, methods=["GET"])
    router.add_api_route(f"/{kind}/{{name}}/preview", preview, methods=["GET"])
    router.add_api_route(f"/{kind}/{{name}}", edit, methods=["POST"])


__all__ = ["build_router"]
