"""`load_pipeline`: diffusers folders, single files, hub ids (offline), missing paths, family detection."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

import booth
from booth.errors import BoothError, NetworkRequiredError
from booth.models import loading
from booth.models.families import FAMILIES, detect_family, detect_family_from_state_dict
from booth.models.loading import classify_model, default_model_path, is_connection_error, load_pipeline


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    """Tiny pipelines written by diffusers' own `save_pretrained`, one folder per family."""
    from booth.models.tiny import tiny_pipeline

    dirs = {}
    for family in ("sd1", "sd2", "sdxl"):
        dirs[family] = tmp_path_factory.mktemp(f"tiny-{family}")
        tiny_pipeline(family).save_pretrained(dirs[family])
    return dirs


@pytest.mark.parametrize("family, expected", [("sd1", "sd1"), ("sd2", "sd2-v"), ("sdxl", "sdxl")])
def test_diffusers_folder(tiny_dirs, monkeypatch, family, expected):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loaded = load_pipeline(tiny_dirs[family])
    assert loaded.family is FAMILIES[expected]
    assert (loaded.name, loaded.path, loaded.hash) == (tiny_dirs[family].name, tiny_dirs[family], None)
    assert loaded.prediction_source == "config"
    assert getattr(loaded.pipe, "safety_checker", None) is None
    assert not loaded.pipe.unet.training and not any(p.requires_grad for p in loaded.pipe.unet.parameters())


def test_folder_prediction_override_and_dtype(tiny_dirs):
    loaded = load_pipeline(str(tiny_dirs["sd1"]), prediction_type="v_prediction", dtype="float16")
    assert loaded.pipe.scheduler.config.prediction_type == "v_prediction"
    assert loaded.prediction_source == "override" and loaded.pipe.unet.dtype == torch.float16


def test_single_file_through_load_pipeline(tmp_path, monkeypatch):
    from booth.models.single_file import save_single_file
    from booth.models.tiny import tiny_pipeline

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = save_single_file(tiny_pipeline("sd1"), tmp_path / "my-model.safetensors")
    loaded = load_pipeline(str(path), dtype=torch.bfloat16)
    assert (loaded.name, loaded.path, loaded.family.name) == ("my-model", path, "sd1")
    assert loaded.hash is not None and len(loaded.hash) == 10 and int(loaded.hash, 16) >= 0
    assert loaded.pipe.unet.dtype == torch.bfloat16 and loaded.pipe.text_encoder.dtype == torch.bfloat16


@pytest.mark.filterwarnings(
    "ignore::UserWarning"
)  # diffusers passes a deprecated argument to huggingface_hub
def test_hub_id_offline_fails_fast(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(NetworkRequiredError) as info:
        load_pipeline("booth-test/no-such-model")
    assert time.monotonic() - start < 15
    assert isinstance(info.value, BoothError)
    assert str(info.value) == (
        "model 'booth-test/no-such-model' is not a local path and the Hugging Face hub cannot be reached "
        "(offline); pass a local diffusers folder or .safetensors/.ckpt file"
    )
    with pytest.raises(NetworkRequiredError):  # local_files_only=True never asks the hub either
        load_pipeline("booth-test/no-such-model", local_files_only=True)


def _online_env(monkeypatch):
    """No offline switch and no proxy: only the probe can tell the loader the hub is away."""
    from huggingface_hub import constants

    for name in (
        "HF_HUB_OFFLINE",
        "TRANSFORMERS_OFFLINE",
        "HTTPS_PROXY",
        "https_proxy",
        "ALL_PROXY",
        "all_proxy",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    return constants


@pytest.mark.filterwarnings(
    "ignore::UserWarning"
)  # diffusers passes a deprecated argument to huggingface_hub
def test_an_unreachable_hub_is_probed_once_and_the_cache_used_without_retries(monkeypatch):
    """Without HF_HUB_OFFLINE an unanswered hub cost huggingface_hub's ~30 s of retries; the probe makes the
    loader ask the cache only (local_files_only) and fail at once."""
    import socket

    constants = _online_env(monkeypatch)
    monkeypatch.setattr(constants, "ENDPOINT", "https://hub.example:8443")
    probed, asked = [], []

    def refuse(address, timeout=None):
        probed.append((address, timeout))
        raise ConnectionRefusedError("refused")

    real = loading._from_pretrained

    def spy(source, local_files_only, dtype):
        asked.append(local_files_only)
        return real(source, local_files_only, dtype)

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(loading, "_from_pretrained", spy)
    start = time.monotonic()
    with pytest.raises(NetworkRequiredError, match="hub cannot be reached"):
        load_pipeline("booth-test/no-such-model")
    assert time.monotonic() - start < 5
    assert probed == [(("hub.example", 8443), 3.0)] and asked == [True]


def test_the_hub_probe_connects_to_the_endpoint_and_trusts_a_proxy(monkeypatch):
    import socket

    constants = _online_env(monkeypatch)
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
        assert loading.hub_reachable() and not loading.hub_offline()
    assert not loading.hub_reachable(timeout=1) and loading.hub_offline()  # the port is closed now
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")  # a proxy's way out is not probed
    assert loading.hub_reachable() and not loading.hub_offline()


def test_connection_errors_are_recognised_through_the_chain():
    from huggingface_hub.errors import OfflineModeIsEnabled

    try:
        try:
            raise OfflineModeIsEnabled("offline")
        except OfflineModeIsEnabled as inner:
            raise OSError("Cannot load model x") from inner
    except OSError as outer:
        assert is_connection_error(outer)
    assert not is_connection_error(OSError("x does not appear to have a file named model_index.json"))


def test_model_references_are_classified(tmp_path):
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "model_index.json").write_text("{}")
    (tmp_path / "model.ckpt").write_bytes(b"")
    assert classify_model(tmp_path / "folder") == "folder"
    assert classify_model(str(tmp_path / "model.ckpt")) == "file"
    assert classify_model("runwayml/stable-diffusion-v1-5") == "hub"
    assert classify_model("org/name") == "hub"


@pytest.mark.parametrize(
    "reference, message",
    [
        ("models/missing.safetensors", "model path not found: models/missing.safetensors"),
        ("./missing", "model path not found: ./missing"),
        ("/no/such/dir", "model path not found: /no/such/dir"),
        ("a/b/c", "model path not found: a/b/c"),
        ("just-a-name", "model path not found: just-a-name"),
        ("  ", "the model path is empty; pass a diffusers folder, a .safetensors/.ckpt file or a hub id"),
    ],
)
def test_missing_paths(reference, message):
    with pytest.raises(BoothError) as info:
        load_pipeline(reference)
    assert str(info.value) == message and not isinstance(info.value, NetworkRequiredError)


def test_paths_that_are_not_models(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("hello")
    for path in (tmp_path / "empty", tmp_path / "notes.txt"):
        with pytest.raises(BoothError, match=r"is not a diffusers folder \(no model_index.json\)"):
            load_pipeline(str(path))
    not_sd = tmp_path / "vae.safetensors"
    from safetensors.torch import save_file

    save_file({"encoder.down.0.block.0.conv1.weight": torch.zeros(1)}, str(not_sd))
    with pytest.raises(
        BoothError, match="vae.safetensors: not a Stable Diffusion checkpoint: it looks like a VAE"
    ):
        load_pipeline(not_sd)


def test_default_model(monkeypatch, tmp_path):
    assert default_model_path() == Path(booth.__file__).parent / "mini" / "weights"
    monkeypatch.setattr(loading, "default_model_path", lambda: tmp_path / "absent")
    with pytest.raises(BoothError) as info:
        load_pipeline(None)
    assert str(info.value) == (
        "the default model booth-mini is not installed yet; pass --model PATH (a diffusers folder or .safetensors/.ckpt)"
    )


def test_default_model_loads_when_installed(monkeypatch, tiny_dirs):
    monkeypatch.setattr(loading, "default_model_path", lambda: tiny_dirs["sd1"])
    assert load_pipeline(None).name == "booth-mini"


def test_bad_options():
    with pytest.raises(BoothError, match="prediction type"):
        load_pipeline(None, prediction_type="sample")
    with pytest.raises(BoothError, match="unknown dtype"):
        load_pipeline(None, dtype="float8")
    with pytest.raises(BoothError, match="unknown device"):
        load_pipeline(None, device="gpu0")


# ------------------------------------------------------------------------------------------------
# family detection


def _keys(*names: str) -> dict[str, None]:
    return dict.fromkeys(["model.diffusion_model.input_blocks.0.0.weight", *names])


def test_family_from_state_dict_keys():
    sd1 = _keys("cond_stage_model.transformer.text_model.embeddings.token_embedding.weight")
    sd2 = _keys("cond_stage_model.model.token_embedding.weight")
    sdxl = _keys(
        "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight",
        "conditioner.embedders.1.model.token_embedding.weight",
    )
    assert detect_family_from_state_dict(sd1).name == "sd1"
    assert detect_family_from_state_dict(sd2).name == "sd2"
    assert detect_family_from_state_dict({**sd2, "v_pred": None}).name == "sd2-v"
    assert detect_family_from_state_dict(sdxl).name == "sdxl"
    with pytest.raises(BoothError, match="refiner"):
        detect_family_from_state_dict(_keys("conditioner.embedders.0.model.token_embedding.weight"))
    with pytest.raises(BoothError, match="no text encoder"):
        detect_family_from_state_dict(_keys())
    with pytest.raises(BoothError, match="LoRA"):
        detect_family_from_state_dict({"lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": None})


def test_family_records():
    assert [FAMILIES[n].default_size for n in ("sd1", "sd2", "sd2-v", "sdxl")] == [512, 512, 768, 1024]
    assert FAMILIES["sd1"].pad_token == "<|endoftext|>" and FAMILIES["sdxl"].pad_token == "!"
    assert FAMILIES["sdxl"].uses_pooled_text and FAMILIES["sdxl"].num_text_encoders == 2
    assert FAMILIES["sd2-v"].prediction_type == "v_prediction"
    assert FAMILIES["sd1"].adapter_targets["custom_diffusion"] == ("attn2.to_k", "attn2.to_v")
    assert len({FAMILIES["sd1"], FAMILIES["sd1"]}) == 1  # hashable


def test_detect_family_from_pipelines():
    from booth.models.tiny import tiny_pipeline

    sd2 = tiny_pipeline("sd2")
    assert detect_family(sd2).name == "sd2-v"
    sd2.scheduler = type(sd2.scheduler).from_config(sd2.scheduler.config, prediction_type="epsilon")
    assert detect_family(sd2).name == "sd2"
    with pytest.raises(BoothError, match="not a text-to-image UNet pipeline"):
        detect_family(object())
