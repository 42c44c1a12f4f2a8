"""`booth loras`: list, search, show and edit LoRA cards (A1111's Lora tab and its metadata editor)."""

from __future__ import annotations

import argparse
import json

from booth.errors import BoothError

EPILOG = """\
examples:
  booth loras --lora-dir ~/sd/models/Lora                      # every LoRA: alias, base, weight, activation text
  booth loras --lora-dir ~/sd/models/Lora --search "dog 0.8"   # cards whose texts or training tags hold both words
  booth loras my_dog --lora-dir runs/my_dog                    # one card: texts, training tags, hash, prompt
  booth loras my_dog --lora-dir runs/my_dog --activation-text "sks dog" --preferred-weight 0.8 --notes "..."
  booth loras my_dog --lora-dir runs/my_dog --preview outputs/00012-1234.png

Edits go to <stem>.json beside the LoRA file (A1111's user metadata, which A1111 and its forks read); other keys
in that file are kept. --preview writes <stem>.png, the preview A1111 shows first.
"""


def add_loras_command(sub) -> None:
    p = sub.add_parser(
        "loras",
        help="list, search, show and edit LoRA cards (A1111's activation text, preferred weight, notes, preview)",
        description="LoRA cards as A1111's Lora tab shows them, read from and written to its side files.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG,
    )
    p.add_argument(
        "name", nargs="?", help="one LoRA (file name or alias): show it, or edit it with the flags below"
    )
    p.add_argument(
        "--lora-dir",
        action="append",
        default=[],
        metavar="DIR",
        help="folder of LoRAs (kohya .safetensors, diffusers LoRA folders, booth runs); repeatable; required",
    )
    p.add_argument("--search", metavar="TEXT", help="only cards holding every word of TEXT (any field, tags)")
    p.add_argument("--json", action="store_true", help="print the cards as JSON")
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
    edit.add_argument(
        "--activation-text", metavar="TEXT", help="words the card adds after its <lora:...> tag"
    )
    edit.add_argument(
        "--preferred-weight", type=float, metavar="W", help="the card's weight (0: the default)"
    )
    edit.add_argument("--negative-text", metavar="TEXT", help="words the card adds to the negative prompt")
    edit.add_argument("--notes", metavar="TEXT")
    edit.add_argument("--preview", metavar="IMAGE", help="a picture to show as the card's preview")
    p.set_defaults(func=cmd_loras)


def cmd_loras(args) -> int:
    from booth.fsutil import check_folders
    from booth.generate.cards import FIELD_NAMES, find_card, lora_cards, save_preview, write_user_metadata
    from booth.generate.networks import LoraNetwork

    if not args.lora_dir:
        raise BoothError("give the folder of your LoRAs: --lora-dir DIR")
    check_folders("--lora-dir", args.lora_dir)
    changes = {
        key: getattr(args, dest) for dest, key in FIELD_NAMES.items() if getattr(args, dest) is not None
    }
    if (changes or args.preview) and not args.name:
        raise BoothError("name the LoRA to edit: booth loras NAME --lora-dir DIR --activation-text ...")
    network = LoraNetwork(args.lora_dir)
    if not args.name:
        cards = lora_cards(network, args.search)
        if args.json:
            print(json.dumps([c.to_dict(args.default_weight) for c in cards], indent=2, ensure_ascii=False))
        elif not cards:
            print("no LoRA matches" if args.search else "no LoRAs found")
        else:
            print(_table(cards, args.default_weight))
        return 0
    if args.search:
        raise BoothError("--search lists cards; leave out NAME, or leave out --search")
    path = network.find(args.name)
    preview = _open_preview(args.preview) if args.preview else None  # read before anything is written
    if changes:
        write_user_metadata(path, changes)
    if preview is not None:
        save_preview(path, preview)
    card = find_card(network, args.name)
    if args.json:
        print(json.dumps(card.to_dict(args.default_weight), indent=2, ensure_ascii=False))
    else:
        print(_details(card, args.default_weight))
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
    rows = [("name", "alias", "base", "weight", "activation text", "preview", "top tags")]
    for card in cards:
        rows.append(
            (
                card.name,
                card.alias if card.alias != card.name else "",
                card.sd_version,
                f"{card.preferred_weight or default_weight:g}",
                _short(card.activation_text, 32),
                "yes" if card.preview or card.has_cover else "",
                _short(", ".join(tag for tag, _ in card.tags[:3]), 32),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    problems = [f"  {card.name}: {card.problem}" for card in cards if card.problem]
    return "\n".join(lines + (["problems:", *problems] if problems else []))


def _details(card, default_weight: float) -> str:
    from booth.models.hashing import lora_shorthash

    weight = (
        f"{card.preferred_weight:g}" if card.preferred_weight else f"none (the default, {default_weight:g})"
    )
    fields = [
        ("name", card.name),
        ("alias", card.alias),
        ("file", card.path),
        ("hash", lora_shorthash(card.path)),
        ("sd version", card.sd_version),
        ("description", card.description),
        ("activation text", card.activation_text),
        ("preferred weight", weight),
        ("negative text", card.negative_text),
        ("notes", card.notes),
        ("preview", card.preview or ("embedded cover" if card.has_cover else "none")),
        ("prompt", card.prompt(default_weight)),
    ]
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


__all__ = ["add_loras_command", "cmd_loras"]
