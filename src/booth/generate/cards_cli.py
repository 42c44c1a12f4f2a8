"""`booth loras` and `booth embeddings`: list, search, show and edit cards (A1111's Lora and Textual Inversion
tabs and their metadata editor)."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass

from booth.errors import BoothError

EPILOG = """\
examples:
  booth loras --lora-dir ~/sd/models/Lora                      # every LoRA: alias, base, weight, activation text
  booth loras --lora-dir ~/sd/models/Lora --search "dog 0.8"   # cards whose texts or training tags hold both words
  booth loras my_dog --lora-dir runs/my_dog                    # one card: texts, training tags, hash, prompt
  booth loras my_dog --lora-dir runs/my_dog --activation-text "sks dog" --preferred-weight 0.8 --notes "..."
  booth loras my_dog --lora-dir runs/my_dog --preview outputs/00012-1234.png
  booth embeddings --embeddings-dir ~/sd/embeddings            # textual-inversion embeddings, the same way

Edits go to <stem>.json beside the file (A1111's user metadata, which A1111 and its forks read); other keys in
that file are kept. --preview writes <stem>.png, the preview A1111 shows first.
"""


@dataclass(frozen=True)
class _Kind:
    command: str
    what: str  # in messages
    flag: str  # the folder flag
    lora: bool


_LORAS = _Kind("loras", "LoRA", "--lora-dir", True)
_EMBEDDINGS = _Kind("embeddings", "embedding", "--embeddings-dir", False)


def add_loras_command(sub) -> None:
    for kind in (_LORAS, _EMBEDDINGS):
        _add_command(sub, kind)


def _add_command(sub, kind: _Kind) -> None:
    lora = kind.lora
    p = sub.add_parser(
        kind.command,
        help=f"list, search, show and edit {kind.what} cards"
        + (" (A1111's activation text, preferred weight, notes, preview)" if lora else " (notes, preview)"),
        description=f"{kind.what} cards as A1111 shows them, read from and written to its side files.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG,
    )
    p.add_argument(
        "name",
        nargs="?",
        help=f"one {kind.what} ({'file name or alias' if lora else 'trigger word'}): show it, or edit it",
    )
    p.add_argument(
        kind.flag,
        dest="folders",
        action="append",
        default=[],
        metavar="DIR",
        help=f"folder of {kind.what}s; repeatable; required",
    )
    p.add_argument("--search", metavar="TEXT", help="only cards holding every word of TEXT (any field, tags)")
    p.add_argument("--json", action="store_true", help="print the cards as JSON")
    if lora:
        p.add_argument(
            "--default-weight",
            type=float,
            default=1.0,
            metavar="W",
            help="weight of a card's prompt when it has no preferred weight (A1111's default multiplier, 1)",
        )
    edit = p.add_argument_group("edit one card (A1111's metadata editor)")
    edit.add_argument("--description", metavar="TEXT")
    edit.add_argument("--sd-version", choices=["Unknown", "SD1", "SD2", "SDXL"])
    if lora:
        edit.add_argument(
            "--activation-text", metavar="TEXT", help="words the card adds after its <lora:...> tag"
        )
        edit.add_argument(
            "--preferred-weight", type=float, metavar="W", help="the card's weight (0: the default)"
        )
        edit.add_argument(
            "--negative-text", metavar="TEXT", help="words the card adds to the negative prompt"
        )
    edit.add_argument("--notes", metavar="TEXT")
    edit.add_argument("--preview", metavar="IMAGE", help="a picture to show as the card's preview")
    p.set_defaults(func=lambda args: cmd_cards(args, kind))


def cmd_cards(args, kind: _Kind) -> int:
    import warnings

    from booth.fsutil import check_folders
    from booth.generate import cards as c

    if not args.folders:
        raise BoothError(f"give the folder of your {kind.what}s: {kind.flag} DIR")
    check_folders(kind.flag, args.folders)
    changes = {
        key: getattr(args, dest)
        for dest, key in c.FIELD_NAMES.items()
        if getattr(args, dest, None) is not None
    }
    if (changes or args.preview) and not args.name:
        raise BoothError(
            f"name the {kind.what} to edit: booth {kind.command} NAME {kind.flag} DIR --notes ..."
        )
    weight = getattr(args, "default_weight", 1.0)
    if kind.lora:
        from booth.generate.networks import LoraNetwork

        network = LoraNetwork(args.folders)
        listing, find = (
            (lambda search: c.lora_cards(network, search)),
            (lambda name: c.find_card(network, name)),
        )
    else:

        def listing(search):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # unreadable files are left out of the list
                return c.embedding_cards(args.folders, search)

        def find(name):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return c.find_embedding_card(args.folders, name)

    if not args.name:
        found = listing(args.search)
        if args.json:
            print(json.dumps([card.to_dict(weight) for card in found], indent=2, ensure_ascii=False))
        elif not found:
            print(f"no {kind.what} matches" if args.search else f"no {kind.what}s found")
        else:
            print(_table(found, weight))
        return 0
    if args.search:
        raise BoothError("--search lists cards; leave out NAME, or leave out --search")
    path = find(args.name).path
    preview = _open_preview(args.preview) if args.preview else None  # read before anything is written
    if changes:
        c.write_user_metadata(path, changes)
    if preview is not None:
        c.save_preview(path, preview)
    card = find(args.name)
    if args.json:
        print(json.dumps(card.to_dict(weight), indent=2, ensure_ascii=False))
    else:
        print(_details(card, weight))
    return 0


def _open_preview(path: str):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return image.convert("RGBA" if image.mode in ("RGBA", "LA", "P") else "RGB")
    except FileNotFoundError:
        raise BoothError(f"--preview {path}: no such file") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise BoothError(f"--preview {path}: not a picture ({exc})") from None


def _short(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def _table(cards, default_weight: float) -> str:
    lora = cards[0].kind == "lora"
    header = (
        ("name", "alias", "base", "weight", "activation text", "preview", "top tags")
        if lora
        else ("name", "base", "preview", "notes")
    )
    rows = [header]
    for card in cards:
        preview = "yes" if card.preview or card.has_cover else ""
        if lora:
            rows.append(
                (
                    card.name,
                    card.alias if card.alias != card.name else "",
                    card.sd_version,
                    f"{card.preferred_weight or default_weight:g}",
                    _short(card.activation_text, 32),
                    preview,
                    _short(", ".join(tag for tag, _ in card.tags[:3]), 32),
                )
            )
        else:
            rows.append((card.name, card.sd_version, preview, _short(card.notes, 48)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    problems = [f"  {card.name}: {card.problem}" for card in cards if card.problem]
    return "\n".join(lines + (["problems:", *problems] if problems else []))


def _details(card, default_weight: float) -> str:
    from booth.generate.cards import card_hash

    lora = card.kind == "lora"
    weight = (
        f"{card.preferred_weight:g}" if card.preferred_weight else f"none (the default, {default_weight:g})"
    )
    fields = [("name", card.name)]
    fields += [("alias", card.alias)] if lora else []
    fields += [("file", card.path), ("hash", card_hash(card)), ("sd version", card.sd_version)]
    fields += [("description", card.description)]
    if lora:
        fields += [("activation text", card.activation_text), ("preferred weight", weight)]
        fields += [("negative text", card.negative_text)]
    fields += [("notes", card.notes)]
    fields += [("preview", card.preview or ("embedded cover" if card.has_cover else "none"))]
    fields += [("prompt", card.prompt(default_weight))]
    if card.negative_prompt():
        fields.append(("negative prompt", card.negative_prompt()))
    if card.tags:
        tags = ", ".join(f"{tag} ({n})" for tag, n in card.tags[:20])
        fields.append(
            ("training tags", tags + (f", ... {len(card.tags) - 20} more" if len(card.tags) > 20 else ""))
        )
    if card.problem:
        fields.append(("problem", card.problem))
    return "\n".join(f"{label + ':':<18}{value}" for label, value in fields)


__all__ = ["add_loras_command", "cmd_cards"]
