"""Extra-network tags and the handler registry (reference a1111.md §6)."""

import pytest

from booth.errors import BoothError
from booth.prompts import (
    ExtraNetworkCall,
    ExtraNetworkHandler,
    ExtraNetworkRegistry,
    LoraCall,
    parse_extra_networks,
)


def test_tags_are_removed_and_split_into_positional_and_named():
    text, calls = parse_extra_networks("a cat <lora:ink:0.7:unet=0.2>, <hypernet:h:1> sky")
    assert text == "a cat ,  sky"
    assert calls == [
        ExtraNetworkCall("lora", ("ink", "0.7"), {"unet": "0.2"}),
        ExtraNetworkCall("hypernet", ("h", "1")),
    ]


def test_not_a_tag():
    for prompt in ("a <b> c", "<:x>", "<lora:>", "a < b > c"):
        assert parse_extra_networks(prompt) == (prompt, [])


def test_item_with_two_equals_signs_is_positional():
    _, [call] = parse_extra_networks("<lora:a=b=c:x=1>")
    assert call.positional == ("a=b=c",)
    assert call.named == {"x": "1"}


@pytest.mark.parametrize(
    "tag, expected",
    [
        ("<lora:ink>", LoraCall("ink", 1.0, 1.0, None)),
        ("<lora:ink:0.8>", LoraCall("ink", 0.8, 0.8, None)),  # unet defaults to te
        ("<lora:ink:0.8:0.5:16>", LoraCall("ink", 0.8, 0.5, 16)),
        ("<lora:ink:te=0.3>", LoraCall("ink", 0.3, 0.3, None)),
        ("<lora:ink:0.8:unet=0.2:dyn=4>", LoraCall("ink", 0.8, 0.2, 4)),
        ("<lora:ink:0.8:0.5:te=0.1>", LoraCall("ink", 0.1, 0.5, None)),
    ],
)
def test_lora_arguments(tag, expected):
    _, [call] = parse_extra_networks(tag)
    assert LoraCall.from_call(call) == expected


@pytest.mark.parametrize("tag", ["<lora:te=1>", "<lora:ink:strong>", "<lora:ink:1:1:x>"])
def test_lora_argument_errors(tag):
    _, [call] = parse_extra_networks(tag)
    with pytest.raises(BoothError):
        LoraCall.from_call(call)


class RecordingHandler:
    def __init__(self, kind):
        self.kind = kind
        self.log = []

    def activate(self, pipeline, calls):
        self.log.append(("activate", pipeline, calls))

    def deactivate(self, pipeline):
        self.log.append(("deactivate", pipeline))

    def infotext_params(self):
        applied = [c.positional[0] for event in self.log if event[0] == "activate" for c in event[2]]
        return {f"{self.kind} used": ", ".join(applied)} if applied else {}


def test_registry_activates_every_handler_and_skips_unknown_kinds():
    lora, hyper = RecordingHandler("lora"), RecordingHandler("hypernet")
    assert isinstance(lora, ExtraNetworkHandler)
    registry = ExtraNetworkRegistry([lora, hyper])
    _, calls = parse_extra_networks("<lora:a:1> <mystery:x> <lora:b:0.5>")
    with pytest.warns(UserWarning, match="mystery"):
        registry.activate_all("pipe", calls)
    assert lora.log == [("activate", "pipe", [calls[0], calls[2]])]
    assert hyper.log == [("activate", "pipe", [])]  # so it can undo an earlier prompt's networks
    registry.deactivate_all("pipe")
    assert lora.log[-1] == ("deactivate", "pipe") and hyper.log[-1] == ("deactivate", "pipe")


def test_registry_rejects_a_second_handler_for_a_kind():
    registry = ExtraNetworkRegistry([RecordingHandler("lora")])
    with pytest.raises(BoothError, match="lora"):
        registry.register(RecordingHandler("lora"))


def test_registry_merges_the_handlers_infotext_params():
    lora, hyper = RecordingHandler("lora"), RecordingHandler("hypernet")
    registry = ExtraNetworkRegistry([lora, hyper])
    assert registry.infotext_params() == {}
    _, calls = parse_extra_networks("<lora:a:1> <hypernet:h:0.5> <lora:b:0.5>")
    registry.activate_all(None, calls)
    assert registry.infotext_params() == {"lora used": "a, b", "hypernet used": "h"}
