"""Probe a mini-CLIP (a finished ``clip/final`` folder or a CLIP-stage ``checkpoint.pt``) on the test renders.

Prints zero-shot top-1 on the 300 test renders for concept (over every concept, "a {concept}"), position
(over the 9 position phrases, with the true concept) and style (over the base styles, with the true concept),
and a linear probe of the object's position from the pooled image features (trained on 1,500 training renders,
tested on 500 others): a vision tower that does not see position scores chance (11%) there.

    python tools/mini_clip_probe.py runs/mini5/clip/final
    python tools/mini_clip_probe.py runs/mini5/clip/checkpoint.pt --work runs/mini5

Measured 2026-12-01: the shipped CLIP's predecessor in runs/mini3 (2,300 steps, hard negatives and the concept
term, default position init): concept 17.7%-level, position linear probe 10.6% (chance 11%).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from booth.mini import architecture as A
from booth.mini.compose import POSITION_PHRASES, POSITIONS


def load(path: Path, work: Path | None):
    from transformers import CLIPModel, CLIPTokenizer

    if path.is_dir():
        return CLIPModel.from_pretrained(path).eval(), CLIPTokenizer.from_pretrained(path)
    config = json.loads((work / "config.json").read_text())["config"]["arch"]["clip"]
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in config.items()}
    model = A.build_clip(A.ClipConfig(**fields))
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True)["model"])
    return model.eval(), A.build_tokenizer(A.ClipConfig(**fields))


def images(folder: Path, records: list[dict]) -> torch.Tensor:
    arrays = np.stack([np.asarray(Image.open(folder / r["file_name"]).convert("RGB")) for r in records])
    return A.clip_pixels(torch.from_numpy(arrays).permute(0, 3, 1, 2))


def _features(out) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out.pooler_output


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("clip", type=Path)
    parser.add_argument("--work", type=Path, help="the work folder of a checkpoint (for its config)")
    parser.add_argument("--data", type=Path, default=Path("data/mini"))
    args = parser.parse_args()
    model, tokenizer = load(args.clip, args.work)

    def text(texts: list[str]) -> torch.Tensor:
        ids = tokenizer(texts, padding="longest", return_tensors="pt").input_ids
        return torch.nn.functional.normalize(_features(model.get_text_features(input_ids=ids)), dim=-1)

    def image(x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize(_features(model.get_image_features(pixel_values=x)), dim=-1)

    test = [json.loads(line) for line in (args.data / "test" / "metadata.jsonl").read_text().splitlines()]
    train = [json.loads(line) for line in (args.data / "train" / "metadata.jsonl").read_text().splitlines()]
    concepts = sorted({r["concept"] for r in train})
    styles = sorted({r["style"] for r in train})
    emb = image(images(args.data / "test", test))
    concept_hits = (emb @ text([f"a {c}" for c in concepts]).T).argmax(1)
    result = {"concept": np.mean([concepts[i] == r["concept"] for i, r in zip(concept_hits.tolist(), test)])}
    position_hits, style_hits = [], []
    for e, r in zip(emb, test):
        texts = [f"a {r['concept']} {POSITION_PHRASES[p]}" for p in POSITIONS]
        position_hits.append(POSITIONS[int((e @ text(texts).T).argmax())] == r["position"])
        texts = [f"a {r['concept']}, {s} style" for s in styles]
        style_hits.append(styles[int((e @ text(texts).T).argmax())] == r["style"])
    result["position"] = float(np.mean(position_hits))
    result["style"] = float(np.mean(style_hits))
    records = [r for r in train[:3000] if r["size"] != "large"][:2000]
    x = images(args.data / "train", records)
    pooled = torch.cat(
        [model.vision_model(pixel_values=x[i : i + 250]).pooler_output for i in range(0, len(x), 250)]
    )
    y = torch.tensor([POSITIONS.index(r["position"]) for r in records])
    f = (pooled - pooled[:1500].mean(0)) / (pooled[:1500].std(0) + 1e-6)
    with torch.enable_grad():
        w = torch.zeros(f.shape[1], len(POSITIONS), requires_grad=True)
        opt = torch.optim.Adam([w], lr=1e-2)
        for _ in range(300):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(f[:1500] @ w, y[:1500]) + 1e-3 * w.pow(2).sum()
            loss.backward()
            opt.step()
    result["position_linear_probe"] = float(((f[1500:] @ w).argmax(1) == y[1500:]).float().mean())
    print(json.dumps({k: round(float(v), 3) for k, v in result.items()}))


if __name__ == "__main__":
    main()
