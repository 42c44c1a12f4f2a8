"""Weighted prompt encoding on tiny real CLIP encoders (reference a1111.md §2, §3, §6)."""

import pytest
import torch

from booth.errors import BoothError
from booth.models.tiny import tiny_pipeline
from booth.prompts import PromptEncoder, cond_at_step, encode_prompt_schedule


@pytest.fixture(scope="module")
def sd1():
    return tiny_pipeline("sd1")


@pytest.fixture(scope="module")
def sd2():
    return tiny_pipeline("sd2")


@pytest.fixture(scope="module")
def sd1_biased():
    """SD1 whose final layer norm has a bias: a fresh LayerNorm makes every row's mean ~0, and the
    "Original" mean restore divides by that mean."""
    pipe = tiny_pipeline("sd1")
    with torch.no_grad():
        pipe.text_encoder.final_layer_norm.bias.copy_(torch.linspace(0.2, 0.6, 32))
    return pipe


@pytest.fixture(scope="module")
def sdxl():
    return tiny_pipeline("sdxl")


def run_plain(tokenizer, text_encoder, text, pad=True):
    """The text encoder on `tokenizer(text)` padded to 77 the way diffusers does it."""
    ids = tokenizer(text, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        return text_encoder(ids, output_hidden_states=True)


def plain(pipe, text):
    return run_plain(pipe.tokenizer, pipe.text_encoder, text).last_hidden_state


def close(a, b):
    return torch.allclose(a, b, atol=1e-5, rtol=1e-5)


def chunk(embeds, i):
    return embeds[:, 77 * i : 77 * (i + 1)]


def token_rows(pipe, text):
    """Token-embedding rows of `text` (no BOS/EOS): vectors that must encode exactly like `text`."""
    ids = pipe.tokenizer(text, add_special_tokens=False).input_ids
    return pipe.text_encoder.get_input_embeddings().weight[ids].detach().clone()


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_unweighted_short_prompt_equals_the_plain_encoder(family, request):
    pipe = request.getfixturevalue(family)
    cond = PromptEncoder.from_pipeline(pipe).encode(["a photo of a cat, sky"])
    assert cond.embeds.shape == (1, 77, 32)
    assert cond.pooled is None and cond.used_embeddings == set()
    assert close(cond.embeds, plain(pipe, "a photo of a cat, sky"))


def test_sd2_pads_with_its_pad_id_after_eos(sd2):
    """Equal to diffusers' "!"-padded input and different from padding with EOS."""
    cond = PromptEncoder.from_pipeline(sd2).encode(["a cat"])
    ids = sd2.tokenizer("a cat", padding="max_length", max_length=77, return_tensors="pt").input_ids
    end = ids[0].tolist().index(sd2.tokenizer.eos_token_id)
    assert end == 4 and ids[0, end + 1 :].eq(0).all()  # BOS a c at EOS, then "!" (id 0)
    eos_padded = ids.clone()
    eos_padded[0, end + 1 :] = sd2.tokenizer.eos_token_id
    with torch.no_grad():
        assert close(cond.embeds, sd2.text_encoder(ids).last_hidden_state)
        assert not close(cond.embeds, sd2.text_encoder(eos_padded).last_hidden_state)


def test_matches_diffusers_encode_prompt(sd1):
    embeds, _ = sd1.encode_prompt("a photo of a cat", "cpu", 1, False)
    assert close(PromptEncoder.from_pipeline(sd1).encode(["a photo of a cat"]).embeds, embeds)


def weighted_rows(pipe, mode):
    """Encoding of "a (cat:1.5) dog" and the per-token multipliers of "a cat dog" (hand-derived)."""
    cond = PromptEncoder.from_pipeline(pipe, emphasis=mode).encode(["a (cat:1.5) dog"])
    n_a, n_cat = (len(pipe.tokenizer(w, add_special_tokens=False).input_ids) for w in ("a", "cat"))
    weights = torch.ones(77)
    weights[1 + n_a : 1 + n_a + n_cat] = 1.5
    return cond.embeds[0], weights


def test_no_norm_scales_rows_by_their_weight(sd1):
    z = plain(sd1, "a cat dog")[0]
    weighted, weights = weighted_rows(sd1, "No norm")
    assert close(weighted, z * weights[:, None])


def test_original_restores_the_chunk_mean(sd1_biased):
    z = plain(sd1_biased, "a cat dog")[0]
    weighted, weights = weighted_rows(sd1_biased, "Original")
    scaled = z * weights[:, None]
    assert close(weighted, scaled * (z.mean() / scaled.mean()))
    assert torch.isclose(weighted.mean(), z.mean(), atol=1e-6)
    assert not close(weighted, z)


def test_ignore_parses_but_drops_weights_and_none_is_literal(sd1):
    ignore = PromptEncoder.from_pipeline(sd1, emphasis="Ignore").encode(["a (cat:1.5) dog"]).embeds
    assert close(ignore, plain(sd1, "a cat dog"))
    literal = PromptEncoder.from_pipeline(sd1, emphasis="None").encode(["a (cat:1.5) dog"]).embeds
    assert close(literal, plain(sd1, "a (cat:1.5) dog"))


def test_long_prompt_is_chunked_by_75(sd1):
    encoder = PromptEncoder.from_pipeline(sd1)
    cond = encoder.encode(["a " * 100])  # "a" is one token
    assert cond.embeds.shape == (1, 154, 32)
    assert close(chunk(cond.embeds, 0), plain(sd1, "a " * 75))
    assert close(chunk(cond.embeds, 1), plain(sd1, "a " * 25))
    assert encoder.token_count("a " * 100) == (100, 150)


def test_break_starts_a_new_chunk(sd1):
    encoder = PromptEncoder.from_pipeline(sd1)
    cond = encoder.encode(["a cat BREAK a dog"])
    assert cond.embeds.shape == (1, 154, 32)
    assert close(chunk(cond.embeds, 0), plain(sd1, "a cat"))
    assert close(chunk(cond.embeds, 1), plain(sd1, "a dog"))
    assert encoder.token_count("a BREAK b") == (76, 150)
    assert encoder.token_count("") == (0, 75)


def test_comma_padding_backtrack(sd1):
    prompt = "a " * 70 + ", " + "b " * 10  # the comma is token 71; the boundary falls 5 tokens after it
    moved = PromptEncoder.from_pipeline(sd1).encode([prompt]).embeds
    assert close(chunk(moved, 0), plain(sd1, "a " * 70 + ","))
    assert close(chunk(moved, 1), plain(sd1, "b " * 10))
    for backtrack in (0, 4):  # disabled, or the comma is too far back
        kept = PromptEncoder.from_pipeline(sd1, comma_padding_backtrack=backtrack).encode([prompt]).embeds
        assert close(chunk(kept, 0), plain(sd1, "a " * 70 + ", " + "b " * 4))
        assert close(chunk(kept, 1), plain(sd1, "b " * 6))


def test_clip_skip_uses_an_earlier_layer_with_final_norm(sd1):
    skip2 = PromptEncoder.from_pipeline(sd1, clip_skip=2).encode(["a photo of a cat"]).embeds
    out = run_plain(sd1.tokenizer, sd1.text_encoder, "a photo of a cat")
    assert close(skip2, sd1.text_encoder.final_layer_norm(out.hidden_states[-2]))
    assert not close(skip2, out.last_hidden_state)


def test_textual_inversion_vectors_replace_the_trigger_word(sd1):
    encoder = PromptEncoder.from_pipeline(sd1, embeddings={"myemb": token_rows(sd1, "cat dog")})
    cond = encoder.encode(["a myemb house"])
    assert close(cond.embeds, plain(sd1, "a cat dog house"))
    assert cond.used_embeddings == encoder.used_embeddings == {"myemb"}
    assert (
        PromptEncoder.from_pipeline(sd1, embeddings={"myemb": token_rows(sd1, "cat")})
        .encode(["a house"])
        .used_embeddings
        == set()
    )


def test_textual_inversion_vectors_take_their_fragment_weight(sd1):
    encoder = PromptEncoder.from_pipeline(
        sd1, emphasis="No norm", embeddings={"myemb": token_rows(sd1, "cat dog")}
    )
    reference = PromptEncoder.from_pipeline(sd1, emphasis="No norm")
    assert close(
        encoder.encode(["a (myemb:1.5) house"]).embeds, reference.encode(["a (cat dog:1.5) house"]).embeds
    )


def test_longest_trigger_wins(sd1):
    embeddings = {"cat": token_rows(sd1, "house"), "cat dog": token_rows(sd1, "red big")}
    cond = PromptEncoder.from_pipeline(sd1, embeddings=embeddings).encode(["a cat dog"])
    assert cond.used_embeddings == {"cat dog"}
    assert close(cond.embeds, plain(sd1, "a red big"))


def test_textual_inversion_is_never_split_across_chunks(sd1):
    encoder = PromptEncoder.from_pipeline(sd1, embeddings={"myemb": token_rows(sd1, "cat dog")})
    n = len(token_rows(sd1, "cat dog"))
    cond = encoder.encode(["a " * (76 - n) + "myemb"])  # one token short of fitting
    assert close(chunk(cond.embeds, 0), plain(sd1, "a " * (76 - n)))
    assert close(chunk(cond.embeds, 1), plain(sd1, "cat dog"))


def test_comma_backtrack_moves_textual_inversion_vectors_too(sd1):
    encoder = PromptEncoder.from_pipeline(sd1, embeddings={"myemb": token_rows(sd1, "house red")})
    n = len(token_rows(sd1, "house red"))
    tail = "b myemb " + "b " * (4 - n) + "b b"  # the 75-token boundary falls inside this tail
    cond = encoder.encode(["a " * 70 + ", " + tail])
    assert close(chunk(cond.embeds, 0), plain(sd1, "a " * 70 + ","))
    assert close(chunk(cond.embeds, 1), plain(sd1, tail.replace("myemb", "house red")))


def test_texts_are_padded_to_the_same_number_of_chunks(sd1):
    encoder = PromptEncoder.from_pipeline(sd1)
    cond = encoder.encode(["a cat", "a " * 100, "a cat"])
    assert cond.embeds.shape == (3, 154, 32)
    assert close(chunk(cond.embeds, 0)[0], plain(sd1, "a cat")[0])
    assert close(chunk(cond.embeds, 1)[0], plain(sd1, "")[0])
    assert torch.equal(cond.embeds[0], cond.embeds[2])
    short, long = encoder.encode(["a cat"]).embeds, encoder.encode(["a " * 160]).embeds
    padded_short, same_long = encoder.pad_to_same_length(short, long)
    assert padded_short.shape == same_long.shape == (1, 231, 32)
    assert torch.equal(same_long, long)
    assert close(chunk(padded_short, 2), plain(sd1, ""))


def test_sdxl_concatenates_penultimate_features_and_pools_the_first_chunk(sdxl):
    encoder = PromptEncoder.from_pipeline(sdxl)
    cond = encoder.encode(["a photo of a cat"])
    assert cond.embeds.shape == (1, 77, 64) and cond.pooled.shape == (1, 32)
    embeds, _, pooled, _ = sdxl.encode_prompt(
        "a photo of a cat", device="cpu", do_classifier_free_guidance=False
    )
    assert close(cond.embeds, embeds) and close(cond.pooled, pooled)
    out_l = run_plain(sdxl.tokenizer, sdxl.text_encoder, "a photo of a cat")
    out_g = run_plain(sdxl.tokenizer_2, sdxl.text_encoder_2, "a photo of a cat")
    skip2 = PromptEncoder.from_pipeline(sdxl, clip_skip=2).encode(["a photo of a cat"]).embeds
    assert close(skip2, torch.cat([out_l.hidden_states[-3], out_g.hidden_states[-3]], dim=-1))
    long = encoder.encode(["a photo of a cat BREAK a dog"])
    assert long.embeds.shape == (1, 154, 64)
    assert close(long.pooled, pooled)


def test_sdxl_textual_inversion_per_encoder(sdxl):
    rows = {
        "clip_l": sdxl.text_encoder.get_input_embeddings().weight[[1212, 736]].detach(),
        "clip_g": sdxl.text_encoder_2.get_input_embeddings().weight[[1212, 736]].detach(),
    }
    assert sdxl.tokenizer("house red", add_special_tokens=False).input_ids == [1212, 736]
    encoder = PromptEncoder.from_pipeline(sdxl, embeddings={"myemb": rows})
    cond, reference = encoder.encode(["a myemb"]), encoder.encode(["a house red"])
    assert close(cond.embeds, reference.embeds) and close(cond.pooled, reference.pooled)
    with pytest.raises(BoothError, match="clip_g"):
        PromptEncoder.from_pipeline(sdxl, embeddings={"myemb": {"clip_l": rows["clip_l"]}})


def test_prompt_schedule_encodes_each_distinct_text_once(sd1):
    encoder = PromptEncoder.from_pipeline(sd1)
    seen = []
    encode = encoder.encode
    encoder.encode = lambda texts: seen.append(list(texts)) or encode(texts)
    schedule = encode_prompt_schedule(encoder, "a [cat|dog] <lora:x:1>", 4)
    assert seen == [["a cat ", "a dog "]]
    assert [end for end, _, _ in schedule] == [1, 2, 3, 4]
    assert close(schedule[0][1], plain(sd1, "a cat ")) and close(schedule[1][1], plain(sd1, "a dog "))
    assert torch.equal(schedule[0][1], schedule[2][1]) and schedule[0][2] is None


def test_cond_at_step_picks_smallest_end_at_or_after_step():
    schedule = [(3, torch.tensor([0.0]), None), (10, torch.tensor([1.0]), None)]
    picks = [cond_at_step(schedule, step)[0].item() for step in range(0, 12)]
    assert picks == [0.0] * 4 + [1.0] * 8


def test_token_count_uses_the_longest_scheduled_and_sub_prompt(sd1):
    encoder = PromptEncoder.from_pipeline(sd1)
    assert encoder.token_count("a AND " + "b " * 80) == (80, 150)
    assert encoder.token_count("[" + "a " * 10 + ":" + "b " * 90 + ":3] <lora:x:1>") == (90, 150)


@pytest.mark.parametrize(
    "kwargs",
    [{"emphasis": "bogus"}, {"clip_skip": 0}, {"clip_skip": 3}, {"embeddings": {"x": torch.zeros(2, 16)}}],
)
def test_bad_configuration_is_a_user_error(sd1, kwargs):
    with pytest.raises(BoothError):
        PromptEncoder.from_pipeline(sd1, **kwargs)
