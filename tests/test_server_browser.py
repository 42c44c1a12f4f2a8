"""The web page end to end in headless Chromium (Playwright, system Chromium) against a real server (uvicorn in a
thread, tiny model): generate an image, upload the subject, train a 4-step LoRA with live progress and a
preview image, "try it", and generate with the LoRA; then "try it" for textual inversion (the word goes into the
prompt) and DreamBooth (the model is selected); and generate with Latent Couple regions."""

from __future__ import annotations

import socket
import threading
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")


@pytest.fixture(scope="module")
def server(tiny_sd1_dir, tmp_path_factory):
    import uvicorn

    from booth.server.app import create_app
    from booth.server.config import ServerConfig

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    import torch

    from booth.models.upscalers import SRVGGNetCompact

    upscalers = tmp_path_factory.mktemp("upscalers")
    torch.save(SRVGGNetCompact(3, 3, 4, 1, 2).state_dict(), upscalers / "2x-Compact.pth")
    from diffusers import AutoencoderKL
    from safetensors.torch import save_file

    vaes = tmp_path_factory.mktemp("vae")
    vae = AutoencoderKL.from_pretrained(tiny_sd1_dir / "vae")
    g = torch.Generator().manual_seed(5)
    save_file({k: (v + 0.05 * torch.randn(v.shape, generator=g)).contiguous() for k, v in vae.state_dict().items()},
              vaes / "mse.safetensors")  # fmt: skip
    styles = vaes / "styles.csv"
    styles.write_text('name,prompt,negative_prompt\nOil,"{prompt}, oil painting",blurry\n')
    data = tmp_path_factory.mktemp("web")
    config = ServerConfig(model=str(tiny_sd1_dir), data_dir=data, port=port, upscaler_dirs=[upscalers])
    config.vae_dirs, config.styles_files = [vaes], [styles]
    from test_server_api import make_lora_dir

    config.lora_dirs = [make_lora_dir(tmp_path_factory.mktemp("loras"))]  # "subj", "subj_run"
    from booth.train.formats.embeddings import save_embedding

    embeddings = tmp_path_factory.mktemp("embeddings")
    save_embedding(
        embeddings / "webword.safetensors", torch.randn(1, 32, generator=torch.Generator().manual_seed(6))
    )
    config.embeddings_dirs = [embeddings]
    from diffusers import ControlNetModel

    from booth.models.tiny import tiny_pipeline

    controlnets = tmp_path_factory.mktemp("controlnet")
    ControlNetModel.from_unet(tiny_pipeline("sd1").unet).save_pretrained(controlnets / "edges")
    config.controlnet_dirs = [controlnets]
    app = create_app(config)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(30)


def open_small_apple(server: str, browser):
    """`open_page` with the prompt "a red apple", 2 steps, 32 x 32 px filled in."""
    page, errors = open_page(server, browser)
    page.fill("#prompt", "a red apple")
    page.fill("#steps", "2")
    page.fill("#width", "32")
    page.fill("#height", "32")
    return page, errors


def open_page(server: str, browser):
    """A new page on the web UI, loaded (samplers listed), and the list its script errors go to."""
    page = browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(server + "/")
    page.wait_for_function("document.querySelectorAll('#sampler option').length > 3")
    return page, errors


def test_page_generates_trains_and_uses_the_lora(server, subject, chromium_browser):
    page, errors = open_page(server, chromium_browser)
    page.wait_for_selector("#conn.on")  # the event stream is connected
    assert page.locator("#scheduler option").count() > 1
    assert page.locator("#model option").count() >= 1

    # 1. generate an image
    page.fill("#prompt", "a sks dog")
    page.fill("#steps", "2")
    page.fill("#seed", "3")
    page.click("#generate")
    page.wait_for_selector("#gallery img", timeout=60_000)
    assert page.eval_on_selector("#gallery img", "i => i.naturalWidth") > 0
    assert "Steps: 2" in page.inner_text("#infotext")
    # the txt2img job arrives through the events, which can trail the HTTP response that brought the image
    page.wait_for_selector("#jobs tbody tr", timeout=10_000)
    assert page.locator("#jobs tbody tr").count() >= 1

    # 2. personalize: upload, pick LoRA, 4 steps, watch progress reach done
    page.set_input_files("#subject-files", sorted(str(f) for f in subject.glob("*.png")))
    assert page.locator("#thumbs img").count() == 3
    page.select_option("#train-method", "lora")
    page.fill("#train-name", "webdog")
    page.fill("#instance-prompt", "a sks dog")
    page.fill("#train-steps", "4")
    page.fill("#train-lr", "0.01")
    page.fill("#train-preview-every", "2")
    page.click("#train-start")
    page.wait_for_function(
        "/step [1-4]\\/4/.test(document.getElementById('train-info').textContent)", timeout=60_000
    )
    page.wait_for_selector("#try-it:not([hidden])", timeout=90_000)
    assert page.inner_text("#train-status").startswith("done")
    assert "loss" in page.inner_text("#train-info")
    assert page.locator("#train-bar").evaluate("d => d.style.width") == "100%"
    page.wait_for_selector("#lora-list button[data-lora=webdog]")
    page.wait_for_selector("#train-preview-box:not([hidden])", timeout=30_000)  # validation image
    assert page.eval_on_selector("#train-preview", "i => i.naturalWidth") > 0
    assert "preview at step" in page.inner_text("#train-preview-caption")
    assert page.locator("#jobs a", has_text="download").count() == 1

    # 3. try it: the LoRA goes into the prompt and generates
    page.click("#try-it")
    assert "<lora:webdog:1>" in page.input_value("#prompt")
    page.click("#generate")
    page.wait_for_function("document.querySelectorAll('#gallery img').length == 2", timeout=60_000)
    assert "webdog" in page.inner_text("#infotext")
    sources = page.eval_on_selector_all("#gallery img", "imgs => imgs.map(i => i.src)")
    assert sources[0] != sources[1]

    # 4. the other methods' "try it": a textual-inversion word, a DreamBooth model
    for method, name in (("textual-inversion", "webti"), ("dreambooth", "webdb")):
        page.select_option("#train-method", method)
        page.fill("#train-name", name)
        page.fill("#train-steps", "2")
        page.fill("#train-preview-every", "0")
        page.click("#train-start")
        page.wait_for_function(
            "/^(done|failed|error)/.test(document.getElementById('train-status').textContent)",
            timeout=90_000,
        )
        assert page.inner_text("#train-status").startswith("done"), page.inner_text("#train-status")
        assert name in page.inner_text("#try-it")
        page.click("#try-it")
    assert "webti" in page.input_value("#prompt")
    page.wait_for_function("document.getElementById('model').value === 'webdb'")
    page.wait_for_function(
        "fetch('/sdapi/v1/options').then(r => r.json()).then(o => o.sd_model_checkpoint === 'webdb')"
    )
    page.click("#generate")
    page.wait_for_function("document.querySelectorAll('#gallery img').length == 3", timeout=60_000)

    # 5. a LoHa: the "LoRA type" menu trains a LyCORIS network, a LoRA for the prompt like any other
    page.select_option("#train-method", "lora")
    page.select_option("#train-algo", "loha")
    page.fill("#train-name", "webloha")
    page.fill("#train-steps", "2")
    page.click("#train-start")
    page.wait_for_function(
        "/^(done|failed|error)/.test(document.getElementById('train-status').textContent)", timeout=90_000
    )
    assert page.inner_text("#train-status").startswith("done"), page.inner_text("#train-status")
    page.wait_for_selector("#lora-list button[data-lora=webloha]")
    network = page.evaluate(
        "fetch('/sdapi/v1/loras').then(r => r.json()).then(l => l.find(x => x.name === 'webloha').metadata)"
    )
    assert network["ss_network_module"] == "lycoris.kohya" and "loha" in network["ss_network_args"]
    assert not errors, errors


def test_page_draws_each_sub_prompt_in_its_region(server, chromium_browser):
    """The "Regions (Latent Couple)" panel sends the extension's alwayson_scripts arguments: the image's
    infotext carries the settings, and a setting that does not fit the prompt comes back as an error line."""
    page, errors = open_page(server, chromium_browser)
    page.fill("#prompt", "a dog AND a red dog AND a blue dog")
    page.fill("#steps", "2")
    page.click("#regions summary")
    page.check("#lc-enabled")
    page.fill("#lc-weights", "0.3,0.7,0.7")
    page.fill("#lc-end", "1")
    page.click("#generate")
    page.wait_for_selector("#gallery img", timeout=60_000)
    info = page.inner_text("#infotext")
    assert (
        'Latent Couple: "divisions=1:1,1:2,1:2 positions=0:0,0:0,0:1 weights=0.3,0.7,0.7 end at step=1"'
        in info
    )
    page.fill("#lc-weights", "0.3,0.7")  # two weights for three sub-prompts
    page.click("#generate")
    page.wait_for_function("document.getElementById('gen-status').textContent.startsWith('error')")
    assert "weights" in page.inner_text("#gen-status")
    page.uncheck("#lc-enabled")
    page.click("#generate")
    page.wait_for_function("document.querySelectorAll('#gallery img').length == 2", timeout=60_000)
    assert "Latent Couple" not in page.inner_text("#infotext")
    assert not errors, errors


def test_page_runs_the_hires_fix(server, chromium_browser):
    """The "Hires. fix" panel lists the server's upscalers (latent modes, then pixel ones and the models of
    --upscaler-dir) and sends enable_hr with its upscaler, scale, steps and strength, the Tiling box
    `tiling`: the image comes back at the upscaled size with A1111's hires keys and Tiling in its infotext."""
    page, errors = open_small_apple(server, chromium_browser)
    page.click("#hires summary")
    page.check("#hr-enabled")
    listed = page.eval_on_selector_all("#hr-upscaler option", "os => os.map(o => o.value)")
    assert listed[0] == "Latent" and listed[-4:] == ["None", "Lanczos", "Nearest", "2x-Compact"]
    page.select_option("#hr-upscaler", "Latent (nearest-exact)")
    page.fill("#hr-scale", "1.5")
    page.fill("#hr-steps", "1")
    page.fill("#hr-denoise", "0.5")
    page.check("#tiling")
    page.click("#generate")
    page.wait_for_selector("#gallery img", timeout=60_000)
    assert page.eval_on_selector("#gallery img", "i => i.naturalWidth") == 48
    info = page.inner_text("#infotext")
    assert "Denoising strength: 0.5" in info
    assert "Hires upscale: 1.5, Hires steps: 1, Hires upscaler: Latent (nearest-exact)" in info
    assert "Tiling: True" in info and "Hires checkpoint" not in info
    checkpoints = page.eval_on_selector_all("#hr-checkpoint option", "os => os.map(o => o.value)")
    assert checkpoints[0] == "Use same checkpoint" and len(checkpoints) >= 2  # then the server's models
    page.select_option("#hr-checkpoint", checkpoints[1])  # the model itself, picked by name: same pass
    page.click("#generate")
    page.wait_for_function("document.querySelectorAll('#gallery img').length === 2", timeout=60_000)
    assert "Hires upscale: 1.5" in page.inner_text("#infotext")
    assert not errors, errors


def test_page_paints_a_mask_and_inpaints_only_there(server, chromium_browser, tmp_path):
    """The image-to-image panel: a picture uploaded, its left half painted with the brush, "Generate from
    picture" sends img2img with the strokes as an RGBA mask; the right half comes back pixel for pixel. Cleared,
    the same button runs plain img2img, which changes the whole picture."""
    import base64
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(3)
    picture = Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))
    picture.save(tmp_path / "picture.png")
    page, errors = open_page(server, chromium_browser)
    page.fill("#prompt", "a red apple")
    page.fill("#steps", "2")
    page.set_input_files("#i2i-file", str(tmp_path / "picture.png"))
    page.wait_for_selector("#i2i-paint:not([hidden])")
    page.fill("#i2i-brush", "16")
    page.fill("#i2i-blur", "0")
    box = page.locator("#i2i-canvas").bounding_box()
    page.mouse.move(box["x"] + box["width"] * 0.2, box["y"] + 2)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.2, box["y"] + box["height"] - 2, steps=8)
    page.mouse.up()

    def generated(count: int) -> tuple[np.ndarray, str]:
        page.click("#i2i-generate")
        page.wait_for_function(f"document.querySelectorAll('#gallery img').length >= {count}", timeout=60_000)
        page.wait_for_function("!document.getElementById('i2i-generate').disabled")
        src = page.eval_on_selector("#gallery img", "i => i.src")
        image = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).convert("RGB")
        return np.asarray(image, dtype=np.int16), page.inner_text("#infotext")

    out, info = generated(1)
    original = np.asarray(picture, dtype=np.int16)
    assert out.shape == original.shape and np.array_equal(out[:, 16:], original[:, 16:])
    assert np.abs(out[:, :12] - original[:, :12]).mean() > 5
    assert "Denoising strength: 0.75" in info and "Inpaint area" not in info  # whole picture, blur 0
    page.click("#i2i-clear")
    out, info = generated(2)
    assert not np.array_equal(out[:, 16:], original[:, 16:])
    assert "Mask blur" not in info and "Denoising strength" in info
    assert not errors, errors


def test_page_sends_a_gallery_image_to_image_to_image(server, chromium_browser):
    """A1111's "Send to img2img": the selected gallery image becomes the picture of the img2img panel, at its
    own size, and generating from it runs img2img (the infotext has its denoising strength)."""
    page, errors = open_page(server, chromium_browser)
    page.fill("#prompt", "a red apple")
    page.fill("#steps", "2")
    page.fill("#width", "48")
    page.fill("#height", "32")
    page.click("#generate")
    page.wait_for_selector("#gallery img", timeout=60_000)
    page.wait_for_function("!document.getElementById('generate').disabled")
    assert page.locator("#i2i-paint").is_hidden()
    page.click("#send-i2i")
    page.wait_for_selector("#i2i-paint:not([hidden])")
    page.wait_for_function("document.getElementById('i2i-canvas').width === 48")
    assert page.eval_on_selector("#i2i-canvas", "c => c.height") == 32
    page.fill("#i2i-denoise", "0.4")
    page.click("#i2i-generate")
    page.wait_for_function(
        "document.getElementById('i2i-status').textContent.includes('image(s)')", timeout=60_000
    )
    assert "Denoising strength: 0.4" in page.inner_text("#infotext")
    assert page.eval_on_selector("#gallery img", "i => i.naturalWidth") == 48
    assert not errors, errors


def test_page_styles_vae_and_the_extras_upscale(server, chromium_browser):
    """The Styles list merges a styles.csv style into the prompts, the VAE menu sets A1111's sd_vae, and "Send
    to extras" upscales a gallery image with the chosen upscaler (A1111's Extras tab)."""
    page, errors = open_page(server, chromium_browser)
    page.wait_for_selector("#styles-box:not([hidden])")
    page.fill("#prompt", "a red apple")
    page.fill("#steps", "2")
    page.fill("#width", "32")
    page.fill("#height", "32")
    page.select_option("#styles", ["Oil"])
    page.select_option("#vae", "mse.safetensors")
    page.wait_for_function(  # the menu's POST /options has landed
        "async () => (await (await fetch('/sdapi/v1/options')).json()).sd_vae === 'mse.safetensors'"
    )
    try:
        page.click("#generate")
        page.wait_for_selector("#gallery img", timeout=60_000)
        page.wait_for_function("!document.getElementById('generate').disabled")
        info = page.inner_text("#infotext")
        assert info.startswith("a red apple, oil painting\nNegative prompt: blurry")
        assert "VAE: mse.safetensors" in info
        page.click("#send-extras")
        page.select_option("#ex-upscaler-1", "Lanczos")
        page.fill("#ex-scale", "2")
        page.click("#ex-run")
        page.wait_for_function("document.getElementById('ex-status').textContent === 'done'", timeout=60_000)
        assert page.eval_on_selector("#gallery img", "i => i.naturalWidth") == 64
        assert page.inner_text("#infotext") == "Postprocess upscale by: 2, Postprocess upscaler: Lanczos"
    finally:
        page.select_option("#vae", "Automatic")
        page.wait_for_function(
            "async () => (await (await fetch('/sdapi/v1/options')).json()).sd_vae === 'Automatic'"
        )
    assert not errors, errors


def test_png_info_sends_a_pictures_settings_to_text_to_image(server, chromium_browser, tmp_path):
    """A1111's PNG Info "Send to txt2img": the form takes the prompt, sampler, schedule, steps, CFG, seed, size
    and hires settings of a dropped picture's infotext."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    text = (
        "a red apple on a table\nNegative prompt: blurry\nSteps: 7, Sampler: Euler a, Schedule type: Karras, "
        "CFG scale: 5.5, Seed: 1234, Size: 48x32, Denoising strength: 0.4, Hires upscale: 1.5, "
        "Hires upscaler: Latent (nearest-exact), Tiling: True"
    )
    info = PngInfo()
    info.add_text("parameters", text)
    Image.new("RGB", (48, 32)).save(tmp_path / "apple.png", pnginfo=info)
    page, errors = open_page(server, chromium_browser)
    assert page.locator("#png-send").is_hidden()
    page.set_input_files("#png-file", str(tmp_path / "apple.png"))
    page.wait_for_selector("#png-send:not([hidden])")
    page.click("#png-send")
    values = page.evaluate(
        "['prompt','negative','steps','cfg','seed','width','height','sampler','hr-scale','hr-denoise','hr-upscaler']"
        ".map(id => document.getElementById(id).value)"
    )
    assert values == ["a red apple on a table", "blurry", "7", "5.5", "1234", "48", "32", "Euler a", "1.5", "0.4",
                      "Latent (nearest-exact)"]  # fmt: skip
    assert page.eval_on_selector("#scheduler", "s => s.options[s.selectedIndex].textContent") == "Karras"
    assert page.is_checked("#hr-enabled") and page.is_checked("#tiling")
    assert not errors, errors


def test_lora_cards_search_edit_insert_and_take_a_preview(server, chromium_browser):
    """The LoRA panel: cards from /booth/v1/loras, search, the editor (training tags, weight, negative text,
    notes) saved to the card's A1111 JSON, a click inserting what A1111's card inserts, and the selected
    gallery picture as the card's preview."""
    page, errors = open_page(server, chromium_browser)
    page.wait_for_selector("#lora-list button[data-lora=subj]")
    page.fill("#lora-search", "subj_run pytorch")  # every word: the diffusers file's path
    page.wait_for_function("document.querySelectorAll('#lora-list .lora-card').length === 1")
    page.fill("#lora-search", "")
    page.wait_for_selector("#lora-list button[data-lora=subj]")

    page.click("#lora-list button[data-edit=subj]")
    page.wait_for_selector("#lora-edit[open]")
    assert page.input_value("#le-sd-version") == "SD1"
    page.fill("#le-activation", "sks dog")
    page.fill("#le-weight", "0.7")
    page.fill("#le-negative", "blurry")
    page.fill("#le-notes", "a web note")
    assert page.is_disabled("#le-use-image")  # nothing generated yet on this page
    page.click("#le-save")
    page.wait_for_function("document.getElementById('le-status').textContent === 'saved'")
    page.click("#le-close")
    card = page.evaluate("fetch('/booth/v1/loras/subj').then(r => r.json())")
    assert card["notes"] == "a web note" and card["prompt"] == "<lora:subj:0.7> sks dog"
    page.fill("#lora-search", "web note")
    page.press("#lora-search", "Enter")  # searches; does not generate
    page.wait_for_function("document.querySelectorAll('#lora-list .lora-card').length === 1")
    assert "sks dog" in page.inner_text("#lora-list button[data-lora=subj]")

    assert page.locator("#gallery img").count() == 0
    page.fill("#prompt", "a photo")
    page.click("#lora-list button[data-lora=subj]")
    assert page.input_value("#prompt") == "a photo <lora:subj:0.7> sks dog"
    assert page.input_value("#negative").endswith("(blurry:1)")
    page.fill("#steps", "2")
    page.click("#generate")
    page.wait_for_selector("#gallery img", timeout=60_000)
    assert "Lora hashes" in page.inner_text("#infotext")

    page.click("#lora-list button[data-edit=subj]")
    page.wait_for_selector("#lora-edit[open]")
    page.click("#le-use-image")
    page.wait_for_function("document.getElementById('le-status').textContent === 'saved'")
    page.click("#le-close")
    page.wait_for_function(
        "(() => { const i = document.querySelector('#lora-list button[data-lora=subj] img');"
        " return i && i.complete && i.naturalWidth > 0; })()"
    )
    assert not errors, errors


def test_the_jobs_table_pauses_the_queue_and_moves_a_job_to_the_top(server, chromium_browser):
    page, errors = open_page(server, chromium_browser)
    page.wait_for_selector("#conn.on")
    page.click("#queue-pause")
    page.wait_for_function("document.getElementById('queue-pause').textContent === 'Resume queue'")
    try:
        ids = page.evaluate(
            """async () => { const ids = [];
              for (const seed of [1, 2, 3]) {
                const r = await fetch('/booth/v1/jobs', {method: 'POST', headers: {'Content-Type': 'application/json'},
                  body: JSON.stringify({kind: 'txt2img', params: {steps: 1, width: 32, height: 32, seed}})});
                ids.push((await r.json()).job.id);
              } return ids; }"""
        )
        for place, job in enumerate(ids, 1):
            page.wait_for_function(
                f"(() => {{ const r = document.querySelector('#jobs tr[data-job=\"{job}\"]');"
                f" return r && r.children[1].textContent === 'queued #{place}'; }})()"
            )
        assert page.locator(f"#jobs tr[data-job='{ids[0]}'] .move-top").count() == 0  # first already
        page.click(f"#jobs tr[data-job='{ids[2]}'] .move-top")
        page.wait_for_function(
            f"document.querySelector('#jobs tr[data-job=\"{ids[2]}\"]').children[1].textContent === 'queued #1'"
        )
        rows = page.eval_on_selector_all("#jobs tbody tr", "rows => rows.map(r => r.dataset.job)")
        assert rows[:3] == [ids[2], ids[0], ids[1]]
        queued = page.evaluate("fetch('/booth/v1/queue?status=queued').then(r => r.json())")["jobs"]
        assert [j["id"] for j in queued] == [ids[2], ids[0], ids[1]]
    finally:
        page.click("#queue-pause")
    page.wait_for_function("document.getElementById('queue-pause').textContent === 'Pause queue'")
    page.wait_for_function(
        f"document.querySelector('#jobs tr[data-job=\"{ids[1]}\"]').children[1].textContent === 'done'",
        timeout=60_000,
    )
    assert not errors, errors


def test_page_draws_an_xyz_plot(server, chromium_browser):
    """The X/Y/Z plot panel sends A1111's x/y/z plot script: the grid comes back (and the single pictures
    when asked), the axis menus listing /sdapi/v1/script-info's choices."""
    page, errors = open_page(server, chromium_browser)
    page.wait_for_function("document.querySelectorAll('#xyz-x-type option').length > 10")  # loaded last
    page.fill("#prompt", "a red apple")
    page.fill("#steps", "2")
    page.fill("#seed", "5")
    page.click("#xyz summary")
    page.select_option("#xyz-x-type", "Steps")
    page.fill("#xyz-x-values", "1,2")
    page.select_option("#xyz-y-type", "CFG Scale")
    page.fill("#xyz-y-values", "3,7")
    page.click("#generate")
    page.wait_for_function(  # the grid decoded (a data URL image decodes after it is inserted)
        "(() => { const i = document.querySelector('#gallery img'); return i && i.complete && i.naturalWidth > 0; })()",
        timeout=60_000,
    )
    width = page.eval_on_selector("#gallery img", "i => i.naturalWidth")
    assert width > 2 * 32  # 2 columns of the model's 32 px pictures, and the row labels
    assert page.locator("#gallery img").count() == 1 and "Steps: 1" in page.inner_text("#infotext")
    page.check("#xyz-lone")
    page.click("#generate")
    page.wait_for_function("document.querySelectorAll('#gallery img').length === 6", timeout=60_000)
    page.select_option("#xyz-x-type", "Nothing")  # off again: a plain picture
    page.click("#generate")
    page.wait_for_function("document.querySelectorAll('#gallery img').length === 7", timeout=60_000)
    assert not errors, errors


def test_embedding_cards_insert_their_word_and_edit_without_the_lora_fields(server, chromium_browser):
    page, errors = open_page(server, chromium_browser)
    page.wait_for_selector("#emb-list button[data-embedding=webword]")
    page.fill("#prompt", "a photo in")
    page.click("#emb-list button[data-embedding=webword]")
    assert page.input_value("#prompt") == "a photo in webword"
    page.click("#emb-list button[data-edit=webword]")
    page.wait_for_selector("#lora-edit[open]")
    assert page.inner_text("#le-what") == "embedding"
    assert not page.is_visible("#le-activation") and not page.is_visible("#le-weight")
    page.fill("#le-notes", "my style word")
    page.click("#le-save")
    page.wait_for_function("document.getElementById('le-status').textContent === 'saved'")
    page.click("#le-close")
    card = page.evaluate("fetch('/booth/v1/embeddings/webword').then(r => r.json())")
    assert card["notes"] == "my style word"
    page.click("#lora-list button[data-edit=subj]")  # a LoRA's editor shows them again
    page.wait_for_selector("#lora-edit[open]")
    assert page.is_visible("#le-activation") and page.inner_text("#le-what") == "LoRA"
    page.click("#le-close")
    assert not errors, errors


def test_generate_forever_repeats_until_stopped(server, chromium_browser):
    page, errors = open_page(server, chromium_browser)
    page.fill("#prompt", "a red apple")
    page.fill("#steps", "1")
    page.fill("#seed", "-1")
    page.click("#forever")
    assert page.inner_text("#forever") == "Stop generating forever"
    page.wait_for_function("document.querySelectorAll('#gallery img').length >= 3", timeout=60_000)
    page.click("#forever")
    page.wait_for_function("!document.getElementById('generate').disabled", timeout=60_000)
    count = page.locator("#gallery img").count()
    page.wait_for_timeout(1500)
    assert page.locator("#gallery img").count() == count  # stopped: nothing more comes
    seeds = {
        text.split("Seed: ")[1].split(",")[0]
        for text in page.eval_on_selector_all("#gallery img", "imgs => imgs.map(i => i.dataset.infotext)")
    }
    assert len(seeds) == count  # a new random seed each time
    assert not errors, errors


def test_page_sends_and_pastes_the_refiner(server, chromium_browser, tmp_path):
    """The "Refiner" panel lists the server's models and sends `refiner_checkpoint` / `refiner_switch_at` with
    txt2img; PNG Info's "Send to text to image" turns it on with a picture's refiner and switch point."""
    import json

    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    page, errors = open_small_apple(server, chromium_browser)
    page.click("#refiner summary")
    page.check("#rf-enabled")
    models = page.eval_on_selector_all("#rf-checkpoint option", "os => os.map(o => o.value)")
    page.select_option("#rf-checkpoint", models[0])
    page.fill("#rf-switch", "0.6")
    with page.expect_request(lambda r: r.url.endswith("/sdapi/v1/txt2img")) as sent:
        page.click("#generate")
    body = json.loads(sent.value.post_data)
    assert body["refiner_checkpoint"] == models[0] and body["refiner_switch_at"] == 0.6
    page.wait_for_function("!document.getElementById('generate').disabled", timeout=60_000)
    assert page.inner_text("#gen-status").endswith("s"), page.inner_text("#gen-status")
    page.uncheck("#rf-enabled")
    with page.expect_request(lambda r: r.url.endswith("/sdapi/v1/txt2img")) as sent:
        page.click("#generate")
    assert "refiner_checkpoint" not in json.loads(sent.value.post_data)

    name = page.eval_on_selector("#rf-checkpoint", "s => s.options[0].textContent")
    info = PngInfo()
    info.add_text(
        "parameters",
        f"a pear\nSteps: 3, Seed: 1, Size: 32x32, Refiner: {name} [0123456789], Refiner switch at: 0.3",
    )
    Image.new("RGB", (32, 32)).save(tmp_path / "pear.png", pnginfo=info)
    page.set_input_files("#png-file", str(tmp_path / "pear.png"))
    page.wait_for_selector("#png-send:not([hidden])")
    page.click("#png-send")
    assert page.is_checked("#rf-enabled") and page.input_value("#rf-switch") == "0.3"
    assert page.input_value("#rf-checkpoint") == models[0]
    assert not errors, errors


def test_page_sends_a_controlnet_unit(server, chromium_browser, tmp_path):
    """The ControlNet panel lists the server's models and preprocessors and sends the extension's unit (model,
    module, weight, window, mode, the chosen picture) in `alwayson_scripts`; the picture comes back with the
    unit in its PNG info."""
    import json

    from PIL import Image

    Image.new("RGB", (32, 32), (255, 255, 255)).save(tmp_path / "edges.png")
    page, errors = open_small_apple(server, chromium_browser)
    page.click("#controlnet summary")
    page.wait_for_function("document.querySelectorAll('#cn-model option').length > 0")
    assert page.eval_on_selector_all("#cn-module option", "os => os.map(o => o.value)")[0] == "none"
    page.check("#cn-enabled")
    page.set_input_files("#cn-image", str(tmp_path / "edges.png"))
    page.select_option("#cn-module", "invert")
    page.click("#cn-preview")  # the map of the white picture, inverted: black
    page.wait_for_selector("#cn-map:not([hidden])")
    assert page.eval_on_selector("#cn-map", "i => i.naturalWidth") > 0
    page.select_option("#cn-module", "none")
    page.fill("#cn-weight", "0.7")
    page.select_option("#cn-mode", "My prompt is more important")
    with page.expect_request(lambda r: r.url.endswith("/sdapi/v1/txt2img")) as sent:
        page.click("#generate")
    (unit,) = json.loads(sent.value.post_data)["alwayson_scripts"]["controlnet"]["args"]
    assert (
        unit["model"] == "edges"
        and unit["weight"] == 0.7
        and unit["image"].startswith("data:image/png;base64,")
    )
    page.wait_for_selector("#gallery img", timeout=60_000)
    info = page.inner_text("#infotext")
    assert (
        'ControlNet 0: "Module: none, Model: edges, Weight: 0.7' in info
        and "My prompt is more important" in info
    )
    assert not errors, errors


def test_page_runs_prompts_from_a_textbox(server, chromium_browser):
    """The "Prompts from file or textbox" panel sends A1111's script with its four arguments: a picture a line,
    each line's prompt before the page's."""
    page, errors = open_small_apple(server, chromium_browser)
    page.click("#prompts-file summary")
    page.fill("#pf-text", "green pear\n--prompt blue plum --steps 1")
    page.check("#pf-same")
    with page.expect_request(lambda r: r.url.endswith("/sdapi/v1/txt2img")) as sent:
        page.click("#generate")
    import json

    body = json.loads(sent.value.post_data)
    assert body["script_name"] == "prompts from file or textbox"
    assert body["script_args"] == [False, True, "start", "green pear\n--prompt blue plum --steps 1"]
    page.wait_for_function("document.querySelectorAll('#gallery img').length === 2", timeout=60_000)
    assert page.inner_text("#infotext").startswith("blue plum a red apple")  # the last picture shown
    page.fill("#pf-text", "")
    assert not errors, errors
