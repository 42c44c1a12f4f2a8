"""`<lora:NAME:TE:UNET>` for the generation engine (A1111 extensions-builtin/Lora semantics, `a1111.md` §6).

`LoraNetwork` is the engine's "lora" extra-network handler. It finds LoRA files by name (kohya/A1111
`<name>.safetensors` files and diffusers LoRA folders), loads each file once per pipeline through diffusers'
`load_lora_weights` (kohya names are converted by diffusers) and activates the prompt's LoRAs with
`set_adapters`: the `te` multiplier on the text encoder(s), the `unet` multiplier on the UNet.

* The same name twice in one prompt: the multipliers add (A1111 applies the network twice, which for a LoRA is
  the same as one application with the summed multiplier).
* A prompt without `<lora:...>` — and every `deactivate` — switches all LoRA layers of the pipeline off, so the
  output is the base model's, bit for bit. Loaded adapters stay in memory for the next prompt; a file whose
  modification time or size changed is reloaded. The handler assumes it owns the adapters of its pipeline.
* LyCORIS files (LoHa, LoKr, Tucker LoCon, full; `booth.train.formats.lycoris`), which diffusers cannot load,
  are patched into the weights as A1111 does (original weights put back afterwards, bit for bit).
* `dyn` (DyLoRA rank) is accepted and ignored.
* Infotext: `Lora hashes: "name: hash, ..."` with the name as written in the prompt (":" and "," removed, as
  A1111 does) and A1111's LoRA shorthash: the first 12 hex digits of the sha256 of the safetensors tensor data
  (kohya's `sshs_model_hash` / the addnet hash, `formats.md` §3.3; `booth.models.hashing.lora_shorthash`).
"""

from __future__ import annotations

import hashlib
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from booth.errors import BoothError
from booth.prompts.extra_networks import ExtraNetworkCall, LoraCall

_COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
_STATE_ATTR = "_booth_lora_adapters"  # on the pipeline: {resolved file: _Loaded}
_SCHEDULE_ATTR = "_booth_lora_schedule"  # on the pipeline: the active `_Schedule`, or None


@dataclass
class _Schedule:
    """The LoRA calls of a generation with a weight schedule, their adapters and the weights set last."""

    loras: list
    owner: dict  # LoRA name -> its `_Loaded`
    adapters: list[str]
    weights: list[dict[str, float]]
    current: list[dict[str, float]] | None = None

    def __post_init__(self) -> None:
        self.current = self.weights


@dataclass
class _Loaded:
    adapter: str
    mtime_ns: int
    size: int
    components: tuple[str, ...]


def _file_stamp(path: Path) -> tuple[int, int]:
    try:
        st = path.stat()
    except OSError as exc:
        raise BoothError(f"cannot read LoRA {path}: {exc.strerror or exc}") from None
    return st.st_mtime_ns, st.st_size


def _adapter_name(name: str, path: Path) -> str:
    """A PEFT adapter name for a file: a valid module key that cannot occur inside a parameter name."""
    clean = re.sub(r"[^0-9A-Za-z_]", "_", name)[:40]
    digest = hashlib.sha1(str(path).encode("utf-8")).hexdigest()[:8]
    return f"booth_{clean}_{digest}"


def _set_lora_enabled(pipe, enabled: bool) -> None:
    """Switch every PEFT layer of the UNet and text encoders on or off (off = the base model exactly)."""
    from booth.train.formats.lora import set_lora_layers_enabled

    for component in _COMPONENTS:
        model = getattr(pipe, component, None)
        if model is not None:
            set_lora_layers_enabled(model, enabled)


def _unpatch(pipe) -> None:
    """Put back the weights LyCORIS networks changed (nothing to do when none did)."""
    from booth.train.formats.lycoris import apply_lycoris

    apply_lycoris(pipe, [])


class LoraNetwork:
    """The "lora" extra-network handler (`booth.prompts.extra_networks.ExtraNetworkHandler`).

    Args:
        dirs: folders searched recursively: every LoRA `*.safetensors` file is available under its stem, every
            folder holding `pytorch_lora_weights.safetensors` under the folder's name.
        files: explicit {name: file or diffusers LoRA folder}; these win over same-named files in `dirs`.
    """

    kind = "lora"

    def __init__(
        self, dirs: list[str | os.PathLike] | tuple = (), files: dict[str, str | os.PathLike] | None = None
    ):
        self.dirs = [Path(d) for d in dirs]
        self.files = {str(name): Path(path) for name, path in (files or {}).items()}
        # every LoRA applied since the last `deactivate` (one generation; composable LoRA activates each AND
        # term's in turn), for the infotext; the first `activate` after a `deactivate` starts it afresh
        self._applied: dict[str, Path] = {}
        self._generation_done = True
        # names resolved to files since the last `deactivate` (one generation): composable LoRA activates each
        # sub-prompt's LoRAs at every sampling step, which must not search the folders every time
        self._resolved: dict[str, Path] = {}
        self._header_cache: dict[tuple, Any] = {}  # header facts by (what, path, mtime, size)

    # ------------------------------------------------------------------------------------------------
    # discovery

    def _is_lora(self, path: Path) -> bool:
        """Whether a safetensors file holds LoRA keys (header only; cached by path, mtime, size)."""
        from booth.train.formats.lora import read_lora_info

        try:
            key = (str(path), *_file_stamp(path))
        except BoothError:
            return False
        if key not in self._header_cache:
            try:
                read_lora_info(path)
                self._header_cache[key] = True
            except BoothError:
                self._header_cache[key] = self._is_lycoris(path)
        return self._header_cache[key]

    def _is_lycoris(self, path: Path) -> bool:
        """Whether a file is a LyCORIS network (LoHa, LoKr, Tucker LoCon, full), which booth patches in."""
        from booth.train.formats.lora import read_safetensors_header
        from booth.train.formats.lycoris import is_lycoris

        try:
            key = ("lycoris", str(path), *_file_stamp(path))
            if key not in self._header_cache:
                self._header_cache[key] = is_lycoris(read_safetensors_header(path)[0])
        except BoothError:
            return False
        return self._header_cache[key]

    def available(self) -> dict[str, Path]:
        """{name: file} of every LoRA found, in name order; the first of equal names (by `dirs` order) wins."""
        from booth.train.formats.lora import DIFFUSERS_LORA_FILE

        found: dict[str, Path] = {}
        for folder in self.dirs:
            if not folder.is_dir():
                continue
            for path in sorted(folder.rglob("*.safetensors")):
                relative = path.relative_to(folder).parts
                if any(part.startswith(".") for part in relative):
                    continue  # hidden files and temp folders of writers in progress
                if path.name == DIFFUSERS_LORA_FILE:
                    name = path.parent.name if path.parent != folder else folder.name
                else:
                    name = path.stem
                if name not in found and self._is_lora(path):
                    found[name] = path
        for name, path in self.files.items():
            found[name] = path / DIFFUSERS_LORA_FILE if path.is_dir() else path
        return dict(sorted(found.items()))

    def aliases(self, available: dict[str, Path] | None = None) -> dict[str, Path]:
        """{alias: file} for the LoRAs whose kohya `ss_output_name` differs from their name and is claimed by no
        other file and no name (A1111 forbids such aliases, and "none"); over `available` (default: a new scan)."""
        available = self.available() if available is None else available
        claimed: dict[str, list[Path]] = {}
        for name, path in available.items():
            alias = self._alias(path)
            if alias and alias != name:
                claimed.setdefault(alias, []).append(path)
        names = {name.lower() for name in available} | {"none"}
        return {
            alias: paths[0]
            for alias, paths in sorted(claimed.items())
            if len(paths) == 1 and alias.lower() not in names
        }

    def _alias(self, path: Path) -> str | None:
        """The file's `ss_output_name` (header only; cached by path, mtime, size), None when it has none."""
        from booth.train.formats.lora import read_safetensors_header

        try:
            key = ("alias", str(path), *_file_stamp(path))
            if key not in self._header_cache:
                alias = read_safetensors_header(path)[1].get("ss_output_name", "").strip()
                self._header_cache[key] = alias or None
        except BoothError:
            return None
        return self._header_cache[key]

    def by_hash(self) -> dict[str, Path]:
        """{A1111 shorthash: file} of every LoRA found: kohya's `sshs_model_hash` where the file records one (as
        A1111 trusts it), else the hash of its tensor data (computed once per file and process)."""
        from booth.models.hashing import LORA_SHORTHASH_LENGTH, lora_shorthash
        from booth.train.formats.lora import read_safetensors_header

        found: dict[str, Path] = {}
        for path in self.available().values():
            try:
                recorded = read_safetensors_header(path)[1].get("sshs_model_hash", "").strip().lower()
                short = recorded[:LORA_SHORTHASH_LENGTH] if recorded else lora_shorthash(path)
            except (BoothError, OSError):
                continue
            found.setdefault(short, path)
        return found

    def find(self, name: str) -> Path:
        """The file for `name` (a file or folder name, else a unique alias, as A1111 resolves `<lora:...>`);
        BoothError listing the available names when there is none."""
        from booth.train.formats.lora import lora_file

        if name in self.files:
            return lora_file(self.files[name])
        available = self.available()
        if name in available:
            return available[name]
        alias = self.aliases(available).get(name)
        if alias is not None:
            return alias
        if available:
            raise BoothError(f"unknown LoRA {name!r}; available: {', '.join(available)}")
        if self.dirs:
            raise BoothError(
                f"unknown LoRA {name!r}: no LoRA files in {', '.join(str(d) for d in self.dirs)}"
            )
        raise BoothError(
            f"unknown LoRA {name!r}: no LoRA folder or file given (--lora-dir DIR or --lora FILE)"
        )

    # ------------------------------------------------------------------------------------------------
    # ExtraNetworkHandler

    def activate(self, pipe, calls: list[ExtraNetworkCall]) -> None:
        """Apply the prompt's LoRAs with their multipliers; with no calls, return the pipeline to its base model."""
        loaded: dict[str, _Loaded] = getattr(pipe, _STATE_ATTR, None) or {}
        if self._generation_done:
            self._applied, self._generation_done = {}, False
        if loaded:
            _set_lora_enabled(pipe, False)  # base model first, also if something below fails
        multipliers: dict[str, list[float]] = {}
        loras = [LoraCall.from_call(call) for call in calls]
        setattr(pipe, _SCHEDULE_ATTR, None)
        for lora in loras:
            te_unet = multipliers.setdefault(lora.name, [0.0, 0.0])
            te_unet[0] += lora.te
            te_unet[1] += lora.unet
        if not multipliers:
            _unpatch(pipe)
            return
        for name in multipliers:  # every name resolves before anything loads
            if name not in self._resolved:
                self._resolved[name] = self.find(name)
        paths = {name: self._resolved[name] for name in multipliers}
        from booth.train.formats.lycoris import apply_lycoris

        lycoris = [n for n in multipliers if paths[n].is_file() and self._is_lycoris(paths[n])]
        for lora in loras:
            if lora.scheduled and lora.name in lycoris:
                raise BoothError(
                    f"<lora:{lora.name}:...>: a weight schedule needs a plain LoRA; this LyCORIS file is merged "
                    "into the weights once a generation"
                )
        networks = [(paths[n], *multipliers[n]) for n in lycoris]
        apply_lycoris(pipe, networks, label=", ".join(lycoris))
        for name in lycoris:
            del multipliers[name]
        self._applied.update({n: paths[n] for n in lycoris})
        if not multipliers:
            return
        entries = {name: self._ensure_loaded(pipe, name, paths[name]) for name in multipliers}
        per_adapter: dict[str, tuple[_Loaded, list[float]]] = {}  # two names for one file add up as well
        for name, (te, unet) in multipliers.items():
            entry = entries[name]
            _, total = per_adapter.setdefault(entry.adapter, (entry, [0.0, 0.0]))
            total[0] += te
            total[1] += unet
        adapters = list(per_adapter)
        weights = [
            {c: (unet if c == "unet" else te) for c in entry.components}
            for entry, (te, unet) in per_adapter.values()
        ]
        _set_lora_enabled(pipe, True)
        pipe.set_adapters(adapters, adapter_weights=weights)
        self._applied.update(paths)
        if any(lora.scheduled for lora in loras):  # loractl: the UNet's weights follow the steps (`step`)
            setattr(pipe, _SCHEDULE_ATTR, _Schedule(loras, entries, adapters, weights))

    def step(self, pipe, step: int, steps: int, hires: bool = False) -> None:
        """The UNet's LoRA weights at sampling step `step` (0-based) of a pass of `steps`, when a prompt's
        LoRA has a weight schedule (the loractl extension); set only when they change."""
        schedule: _Schedule | None = getattr(pipe, _SCHEDULE_ATTR, None)
        if schedule is None:
            return
        unet: dict[str, float] = {}
        for lora in schedule.loras:
            adapter = schedule.owner[lora.name].adapter
            unet[adapter] = unet.get(adapter, 0.0) + lora.unet_at(step, steps, hires)
        weights = [
            {**w, "unet": unet[adapter]} if "unet" in w else w
            for adapter, w in zip(schedule.adapters, schedule.weights, strict=True)
        ]
        if weights != schedule.current:
            pipe.set_adapters(schedule.adapters, adapter_weights=weights)
            schedule.current = weights

    @staticmethod
    def scheduled(calls: list[ExtraNetworkCall]) -> bool:
        """Whether any of `calls` gives its LoRA a weight schedule."""
        return any(LoraCall.from_call(call).scheduled for call in calls)

    def deactivate(self, pipe) -> None:
        """Switch the LoRA layers off, keeping them loaded for the next prompt."""
        self._resolved.clear()  # the next prompt looks in the folders again (files may have come or gone)
        self._generation_done = True
        setattr(pipe, _SCHEDULE_ATTR, None)
        if getattr(pipe, _STATE_ATTR, None):
            _set_lora_enabled(pipe, False)
        _unpatch(pipe)

    def infotext_params(self) -> dict[str, str]:
        """{"Lora hashes": "name: shorthash, ..."} for every LoRA applied in the last generation (the calls
        since the last `deactivate`, in the order first applied), {} if none."""
        from booth.models.hashing import lora_shorthash

        if not self._applied:
            return {}
        clean = str.maketrans("", "", ":,")
        return {
            "Lora hashes": ", ".join(
                f"{name.translate(clean)}: {lora_shorthash(p)}" for name, p in self._applied.items()
            )
        }

    # ------------------------------------------------------------------------------------------------
    # loading

    def load(self, pipe, name: str, path: Path) -> str:
        """Load the LoRA file at `path` into `pipe` (once while unchanged) without activating it; its adapter
        name."""
        return self._ensure_loaded(pipe, name, path).adapter

    def unload(self, pipe, path: Path) -> None:
        """Remove the adapter `load` added for `path` from `pipe`, layers and record."""
        loaded: dict[str, _Loaded] = getattr(pipe, _STATE_ATTR, None) or {}
        entry = loaded.pop(str(path.resolve()), None)
        if entry is not None:
            self._delete(pipe, entry.adapter)

    def _ensure_loaded(self, pipe, name: str, path: Path) -> _Loaded:
        from booth.train.formats.lora import load_lora_into_pipeline

        loaded: dict[str, _Loaded] = getattr(pipe, _STATE_ATTR, None)
        if loaded is None:
            loaded = {}
            setattr(pipe, _STATE_ATTR, loaded)
        key = str(path.resolve())
        mtime_ns, size = _file_stamp(path)
        entry = loaded.get(key)
        if entry is not None and (entry.mtime_ns, entry.size) == (mtime_ns, size):
            return entry
        adapter = _adapter_name(name, path.resolve())
        if entry is not None:  # the file changed on disk
            self._delete(pipe, entry.adapter)
            del loaded[key]
        try:
            load_lora_into_pipeline(pipe, path, adapter, label=name)
        except BaseException:
            self._delete(pipe, adapter)  # no half-loaded adapter stays behind
            raise
        components = tuple(c for c, names in pipe.get_list_adapters().items() if adapter in names)
        entry = loaded[key] = _Loaded(adapter, mtime_ns, size, components)
        return entry

    @staticmethod
    def _delete(pipe, adapter: str) -> None:
        from diffusers.utils.peft_utils import delete_adapter_layers

        for component in _COMPONENTS:
            model = getattr(pipe, component, None)
            if model is not None and adapter in (getattr(model, "peft_config", None) or {}):
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", message="Adapter .* was active which is now deleted")
                    delete_adapter_layers(model, adapter)
                config = getattr(model, "peft_config", None)
                if config is not None:
                    config.pop(adapter, None)


def find_lora(name: str, dirs: list[str | os.PathLike] | tuple) -> Path:
    """The LoRA file `<lora:name:...>` means in `dirs`; BoothError listing the available names when unknown."""
    return LoraNetwork(dirs).find(name)


_PASTED_LORA = re.compile(r"<lora:([^:>]+):")


def remap_pasted_loras(prompt: str, lora_hashes: str | None, network: LoraNetwork) -> str:
    """A1111's `infotext_pasted` for LoRAs: each `<lora:NAME:` of a pasted prompt whose NAME the infotext's
    `Lora hashes` ("name: shorthash, ...") gives a hash of becomes the local LoRA with that hash, written as its
    card writes it (alias or name); names without a hash, or whose hash no local file has, stay as they are."""
    hashes = {}
    for entry in (lora_hashes or "").split(","):
        name, sep, short = entry.partition(":")
        if sep and name.strip() and short.strip():
            hashes[name.strip()] = short.strip().lower()
    if not hashes or "<lora:" not in prompt:
        return prompt
    local = network.by_hash()
    if not local:
        return prompt
    available = network.available()
    aliases = {path: alias for alias, path in network.aliases(available).items()}
    names = {path: name for name, path in available.items()}

    def replace(match: re.Match[str]) -> str:
        path = local.get(hashes.get(match.group(1).strip(), ""))
        if path is None:
            return match.group(0)
        return f"<lora:{aliases.get(path, names[path])}:"

    return _PASTED_LORA.sub(replace, prompt)


def lora_list(dirs: list[str | os.PathLike] | tuple) -> list[dict[str, Any]]:
    """A1111 `/sdapi/v1/loras` entries: name, alias (`ss_output_name` or the name), path, metadata."""
    from booth.train.formats.lora import read_safetensors_header

    entries = []
    for name, path in LoraNetwork(dirs).available().items():
        metadata = read_safetensors_header(path)[1]  # LyCORIS files too
        entries.append(
            {
                "name": name,
                "alias": metadata.get("ss_output_name", name),
                "path": str(path),
                "metadata": metadata,
            }
        )
    return entries


__all__ = ["LoraNetwork", "find_lora", "lora_list", "remap_pasted_loras"]
