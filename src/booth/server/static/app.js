// booth web page: plain JS against /sdapi/v1 (A1111) and /booth/v1 (queue, training, events). No build step.
"use strict";
const $ = (id) => document.getElementById(id);
const jobs = new Map();
let training = null; // id of the training job this page started
let previewEvery = 0; // its preview_every
let previewShown = null; // the step whose preview is shown

async function api(method, path, body) {
  const init = { method, headers: {} };
  if (body instanceof FormData) init.body = body;
  else if (body !== undefined) { init.body = JSON.stringify(body); init.headers["Content-Type"] = "application/json"; }
  const r = await fetch(path, init);
  const text = await r.text();
  const data = text ? JSON.parse(text) : null;
  if (!r.ok) throw new Error((data && (data.detail || data.error)) || r.statusText);
  return data;
}

function option(select, value, label) {
  const o = document.createElement("option");
  o.value = value; o.textContent = label || value;
  select.appendChild(o);
}

function fmtSeconds(s) {
  if (s == null) return "?";
  s = Math.round(s);
  return s >= 60 ? `${Math.floor(s / 60)}m ${s % 60}s` : `${s}s`;
}

// ---- setup -------------------------------------------------------------------------------------------
async function loadLists() {
  const [samplers, schedulers, models, options, latents, upscalers, vaes, styles] = await Promise.all([
    api("GET", "/sdapi/v1/samplers"), api("GET", "/sdapi/v1/schedulers"),
    api("GET", "/sdapi/v1/sd-models"), api("GET", "/sdapi/v1/options"),
    api("GET", "/sdapi/v1/latent-upscale-modes"), api("GET", "/sdapi/v1/upscalers"),
    api("GET", "/sdapi/v1/sd-vae"), api("GET", "/sdapi/v1/prompt-styles"),
  ]);
  $("hr-upscaler").textContent = ""; // the latent modes, then the pixel upscalers (models of --upscaler-dir)
  for (const u of [...latents, ...upscalers]) option($("hr-upscaler"), u.name);
  $("hr-upscaler").value = "Latent";
  for (const id of ["ex-upscaler-1", "ex-upscaler-2"]) for (const u of upscalers) option($(id), u.name);
  $("ex-upscaler-1").value = upscalers.some((u) => u.name === "Lanczos") ? "Lanczos" : upscalers[0].name;
  $("ex-upscaler-2").value = "None";
  for (const v of vaes) option($("vae"), v.model_name);
  $("vae").value = options.sd_vae;
  for (const st of styles) option($("styles"), st.name);
  $("styles-box").hidden = !styles.length;
  for (const s of samplers) option($("sampler"), s.name);
  $("sampler").value = samplers.some((s) => s.name === "Euler a") ? "Euler a" : samplers[0].name;
  for (const s of schedulers) option($("scheduler"), s.name, s.label);
  for (const m of models) option($("model"), m.title, m.model_name);
  for (const m of models) option($("hr-checkpoint"), m.title, m.model_name);
  for (const m of models) option($("rf-checkpoint"), m.title, m.model_name);
  $("model").value = options.sd_model_checkpoint;
  await loadLoras();
  await loadAxes();
  await loadControlNets();
}

// the ControlNet panel: the server's models and preprocessors (the extension's routes)
async function loadControlNets() {
  const [models, modules] = await Promise.all([api("GET", "/controlnet/model_list"), api("GET", "/controlnet/module_list")]);
  $("cn-model").textContent = "";
  for (const m of models.model_list) option($("cn-model"), m);
  $("cn-module").textContent = "";
  for (const m of modules.module_list) option($("cn-module"), m);
}

// the preprocessor's map of the chosen picture (the extension's /controlnet/detect)
$("cn-preview").onclick = async () => {
  const file = $("cn-image").files[0];
  if (!file) { alert("choose a control picture first"); return; }
  try {
    const r = await api("POST", "/controlnet/detect", {
      controlnet_module: $("cn-module").value, controlnet_input_images: [await readBase64(file)],
    });
    $("cn-map").src = "data:image/png;base64," + r.images[0];
    $("cn-map").hidden = false;
  } catch (e) { alert(e.message); }
};

// the extension's unit from the panel, into `req.alwayson_scripts` (beside other extensions' entries)
async function addControlNet(req) {
  if (!$("cn-enabled").checked) return req;
  const file = $("cn-image").files[0];
  const unit = {
    enabled: true, model: $("cn-model").value, module: $("cn-module").value, weight: parseFloat($("cn-weight").value),
    guidance_start: parseFloat($("cn-start").value), guidance_end: parseFloat($("cn-end").value),
    control_mode: $("cn-mode").value,
  };
  if (file) unit.image = await readBase64(file);
  req.alwayson_scripts = { ...(req.alwayson_scripts || {}), controlnet: { args: [unit] } };
  return req;
}

// the x/y/z plot's axis types, as /sdapi/v1/script-info lists them
async function loadAxes() {
  const scripts = await api("GET", "/sdapi/v1/script-info");
  const xyz = scripts.find((s) => s.name === "x/y/z plot" && !s.is_img2img);
  for (const k of ["x", "y", "z"]) for (const name of xyz.args[0].choices) option($(`xyz-${k}-type`), name);
}

async function loadModels() {
  const current = $("model").value;
  const models = await api("GET", "/sdapi/v1/sd-models");
  $("model").textContent = "";
  for (const m of models) option($("model"), m.title, m.model_name);
  $("model").value = current;
  const hires = $("hr-checkpoint").value;
  $("hr-checkpoint").textContent = "";
  option($("hr-checkpoint"), "Use same checkpoint");
  for (const m of models) option($("hr-checkpoint"), m.title, m.model_name);
  $("hr-checkpoint").value = [...$("hr-checkpoint").options].some((o) => o.value === hires) ? hires : "Use same checkpoint";
  const refiner = $("rf-checkpoint").value;
  $("rf-checkpoint").textContent = "";
  for (const m of models) option($("rf-checkpoint"), m.title, m.model_name);
  if ([...$("rf-checkpoint").options].some((o) => o.value === refiner)) $("rf-checkpoint").value = refiner;
}

async function selectModel(title) {
  if (![...$("model").options].some((o) => o.value === title)) await loadModels();
  $("model").value = title;
  await api("POST", "/sdapi/v1/options", { sd_model_checkpoint: title });
}

// Cards (/booth/v1/loras, /booth/v1/embeddings): preview, name, activation text; a click inserts what A1111's
// card inserts (<lora:alias:preferred weight> + activation text, the negative text into the negative prompt;
// an embedding's trigger word); ✎ edits the card's A1111 user metadata. The search box filters both kinds.
const CARD_KINDS = { loras: { list: "lora-list", count: "lora-count", what: "LoRA" },
  embeddings: { list: "emb-list", count: "emb-count", what: "embedding" } };
let loraSearchTimer = null;
async function loadCards(kind) {
  const k = CARD_KINDS[kind];
  const list = $(k.list);
  const query = $("lora-search").value.trim();
  const cards = (await api("GET", `/booth/v1/${kind}` + (query ? "?search=" + encodeURIComponent(query) : "")))[kind];
  list.textContent = "";
  $(k.count).textContent = cards.length ? `${cards.length}` : (query ? "no match" : "none yet");
  for (const l of cards) {
    const card = document.createElement("div");
    card.className = "lora-card";
    const b = document.createElement("button");
    b.type = "button"; b.className = "pick";
    b.dataset[kind === "loras" ? "lora" : "embedding"] = l.name;
    b.title = [l.description, l.notes, l.problem].filter(Boolean).join("\n") || l.prompt;
    if (l.preview_url) {
      const img = document.createElement("img");
      img.src = l.preview_url + "?t=" + Date.now(); img.alt = l.name;
      b.appendChild(img);
    } else {
      const none = document.createElement("span");
      none.className = "noimg"; none.textContent = l.sd_version;
      b.appendChild(none);
    }
    const name = document.createElement("span");
    name.textContent = l.alias === l.name ? l.name : `${l.name} (${l.alias})`;
    b.appendChild(name);
    if (l.activation_text) {
      const words = document.createElement("span");
      words.className = "words"; words.textContent = l.activation_text;
      b.appendChild(words);
    }
    b.onclick = () => {
      insertPrompt(l.prompt);
      if (l.negative_prompt) insertText($("negative"), l.negative_prompt);
    };
    const edit = document.createElement("button");
    edit.type = "button"; edit.className = "edit"; edit.dataset.edit = l.name; edit.textContent = "✎";
    edit.title = `edit this ${k.what}'s card`;
    edit.onclick = () => openCardEditor(kind, l.name);
    card.append(b, edit);
    list.appendChild(card);
  }
}
async function loadLoras() { await Promise.all([loadCards("loras"), loadCards("embeddings")]); }
$("lora-search").onkeydown = (e) => { if (e.key === "Enter") e.preventDefault(); }; // not "Generate"
$("lora-search").oninput = () => {
  clearTimeout(loraSearchTimer);
  loraSearchTimer = setTimeout(() => loadLoras().catch((e) => { $("lora-count").textContent = e.message; }), 200);
};

let editing = null; // {kind, name} of the card in the editor
async function openCardEditor(kind, name) {
  const l = await api("GET", `/booth/v1/${kind}/` + encodeURIComponent(name));
  editing = { kind, name };
  const lora = kind === "loras";
  $("le-what").textContent = CARD_KINDS[kind].what;
  $("le-name").textContent = l.alias === l.name ? l.name : `${l.name} (${l.alias})`;
  $("le-file").textContent = `${l.path} · hash ${l.hash}`;
  $("le-description").value = l.description;
  $("le-sd-version").value = l.sd_version;
  for (const id of ["le-lora-only", "le-activation-box", "le-negative-box"]) $(id).hidden = !lora;
  $("le-weight").value = l.preferred_weight || "";
  $("le-activation").value = l.activation_text;
  $("le-negative").value = l.negative_text;
  $("le-notes").value = l.notes;
  $("le-status").textContent = l.problem || "";
  $("le-tags").textContent = "";
  $("le-tags-label").hidden = !l.tags.length;
  for (const [tag, count] of l.tags.slice(0, 40)) {
    const t = document.createElement("button");
    t.type = "button"; t.textContent = `${tag} ${count}`; t.dataset.tag = tag;
    t.onclick = () => {
      const words = $("le-activation").value.split(",").map((w) => w.trim()).filter(Boolean);
      if (!words.includes(tag)) $("le-activation").value = [...words, tag].join(", ");
    };
    $("le-tags").appendChild(t);
  }
  $("le-use-image").disabled = !document.querySelector("#gallery img.sel");
  $("lora-edit").showModal();
}

async function saveCard(extra) {
  $("le-status").textContent = "saving…";
  const fields = { description: $("le-description").value, sd_version: $("le-sd-version").value,
    notes: $("le-notes").value };
  if (editing.kind === "loras") {
    Object.assign(fields, { preferred_weight: parseFloat($("le-weight").value) || 0,
      activation_text: $("le-activation").value, negative_text: $("le-negative").value });
  }
  try {
    await api("POST", `/booth/v1/${editing.kind}/` + encodeURIComponent(editing.name), { ...fields, ...extra });
    $("le-status").textContent = "saved";
    await loadCards(editing.kind);
  } catch (e) { $("le-status").textContent = e.message; }
}
$("le-save").onclick = () => saveCard({});
$("le-use-image").onclick = () => {
  const selected = document.querySelector("#gallery img.sel");
  if (selected) saveCard({ preview: selected.src });
};

function insertText(field, text) {
  if (!field.value.includes(text)) field.value = (field.value.trim() + " " + text).trim();
}
function insertPrompt(text) {
  insertText($("prompt"), text);
  $("prompt").focus();
}

$("model").onchange = () => api("POST", "/sdapi/v1/options", { sd_model_checkpoint: $("model").value })
  .catch((e) => alert(e.message));
$("vae").onchange = () => api("POST", "/sdapi/v1/options", { sd_vae: $("vae").value })
  .catch((e) => alert(e.message));

// ---- txt2img -------------------------------------------------------------------------------------------
function intOrNull(id) { const v = $(id).value; return v === "" ? null : parseInt(v, 10); }

// the fields txt2img and img2img share, from the generation form (the refiner's too)
function generationRequest() {
  const req = {
    prompt: $("prompt").value, negative_prompt: $("negative").value, sampler_name: $("sampler").value,
    scheduler: $("scheduler").value || null, steps: intOrNull("steps"), cfg_scale: parseFloat($("cfg").value),
    seed: intOrNull("seed") ?? -1, width: intOrNull("width"), height: intOrNull("height"),
    batch_size: intOrNull("batch") || 1, n_iter: intOrNull("n-iter") || 1, tiling: $("tiling").checked,
    styles: [...$("styles").selectedOptions].map((o) => o.value),
  };
  if ($("rf-enabled").checked) {
    Object.assign(req, { refiner_checkpoint: $("rf-checkpoint").value, refiner_switch_at: parseFloat($("rf-switch").value) });
  }
  return req;
}

async function runGeneration(path, req, button, status) {
  button.disabled = true;
  status.textContent = "generating…";
  const t0 = performance.now();
  try {
    const r = await api("POST", path, req);
    const info = JSON.parse(r.info);
    r.images.forEach((b64, i) => addImage(b64, (info.infotexts || [])[i] || ""));
    status.textContent = `${r.images.length} image(s) in ${((performance.now() - t0) / 1000).toFixed(1)} s`;
  } catch (e) {
    status.textContent = "error: " + e.message;
  } finally {
    button.disabled = false;
  }
}

$("gen-form").onsubmit = async (ev) => {
  ev.preventDefault();
  const req = generationRequest();
  if ($("hr-enabled").checked) {
    Object.assign(req, {
      enable_hr: true, hr_upscaler: $("hr-upscaler").value, hr_scale: parseFloat($("hr-scale").value),
      hr_second_pass_steps: intOrNull("hr-steps") || 0, denoising_strength: parseFloat($("hr-denoise").value),
      hr_checkpoint_name: $("hr-checkpoint").value,
    });
  }
  if ($("lc-enabled").checked) {  // the Latent Couple extension's arguments, in its order
    req.alwayson_scripts = { "Latent Couple extension": { args: [
      true, $("lc-divisions").value, $("lc-positions").value, $("lc-weights").value, intOrNull("lc-end") ?? 20,
    ] } };
  }
  if ($("xyz-x-type").value !== "Nothing") {  // A1111's x/y/z plot script, its arguments in its order
    const axis = (k) => [$(`xyz-${k}-type`).value, $(`xyz-${k}-values`).value, []];
    req.script_name = "x/y/z plot";
    req.script_args = [...axis("x"), ...axis("y"), ...axis("z"), true, $("xyz-lone").checked];
  } else if ($("pf-text").value.trim()) {  // A1111's prompts from file or textbox, its arguments in its order
    req.script_name = "prompts from file or textbox";
    req.script_args = [$("pf-iterate").checked, $("pf-same").checked, $("pf-position").value, $("pf-text").value];
  }
  await runGeneration("/sdapi/v1/txt2img", await addControlNet(req), $("generate"), $("gen-status"));
  if (forever) setTimeout(() => { if (forever) $("gen-form").requestSubmit(); }, 0);  // the settings as they are now
};
$("interrupt").onclick = () => { setForever(false); api("POST", "/sdapi/v1/interrupt").catch(() => {}); };

// A1111's "Generate forever": a new generation each time one ends, until stopped (or Interrupt)
let forever = false;
function setForever(on) {
  forever = on;
  $("forever").textContent = on ? "Stop generating forever" : "Generate forever";
  $("forever").classList.toggle("primary", on);
}
$("forever").onclick = () => {
  setForever(!forever);
  if (forever && !$("generate").disabled) $("gen-form").requestSubmit();
};

function addImage(b64, infotext) {
  const img = document.createElement("img");
  img.src = "data:image/png;base64," + b64;
  img.alt = infotext.split("\n")[0];
  img.title = infotext;
  img.dataset.infotext = infotext;
  img.onclick = () => {
    document.querySelectorAll("#gallery img.sel").forEach((x) => x.classList.remove("sel"));
    img.classList.add("sel");
    $("infotext").hidden = false;
    $("infotext").textContent = infotext;
    $("send-i2i").hidden = false;
    $("send-extras").hidden = false;
  };
  $("gallery").prepend(img);
  img.onclick();
}

// ---- png info ------------------------------------------------------------------------------------------
function readBase64(file) {
  return new Promise((resolve, reject) => {
    const r = new FileReader();
    r.onload = () => resolve(r.result);
    r.onerror = reject;
    r.readAsDataURL(file);
  });
}
// ---- img2img and inpainting ------------------------------------------------------------------------------
// The picture is shown on a canvas; strokes go to a transparent canvas of the picture's size whose alpha is
// the mask sent to /sdapi/v1/img2img (an RGBA mask with transparency: its alpha channel, as in A1111).
const i2i = { image: null, dataUrl: null, strokes: null, painted: false, last: null };

$("i2i-file").onchange = async () => {
  const file = $("i2i-file").files[0];
  if (file) loadPicture(await readBase64(file));
};

// show a picture (a data URL) in the img2img panel, with an empty mask
function loadPicture(dataUrl) {
  i2i.dataUrl = dataUrl;
  const img = new Image();
  img.onload = () => {
    const c = $("i2i-canvas");
    c.width = img.naturalWidth; c.height = img.naturalHeight;
    i2i.image = img;
    i2i.strokes = document.createElement("canvas");
    i2i.strokes.width = c.width; i2i.strokes.height = c.height;
    i2i.painted = false;
    $("i2i-paint").hidden = false;
    drawPicture();
  };
  img.src = dataUrl;
}

// A1111's "Send to img2img": the selected gallery image becomes the picture
$("send-i2i").onclick = () => {
  const selected = document.querySelector("#gallery img.sel");
  if (!selected) return;
  $("i2i-file").value = "";
  loadPicture(selected.src);
  $("img2img").scrollIntoView({ behavior: "smooth" });
};

// ---- extras (upscale) ------------------------------------------------------------------------------------
function loadExtrasPicture(dataUrl) {
  $("ex-picture").src = dataUrl;
  $("ex-picture").hidden = false;
}
$("ex-file").onchange = async () => {
  const file = $("ex-file").files[0];
  if (file) loadExtrasPicture(await readBase64(file));
};
$("send-extras").onclick = () => {
  const selected = document.querySelector("#gallery img.sel");
  if (!selected) return;
  $("ex-file").value = "";
  loadExtrasPicture(selected.src);
  $("extras").scrollIntoView({ behavior: "smooth" });
};
$("ex-run").onclick = async () => {
  if ($("ex-picture").hidden) { $("ex-status").textContent = "choose a picture first"; return; }
  $("ex-run").disabled = true;
  $("ex-status").textContent = "upscaling…";
  try {
    const r = await api("POST", "/sdapi/v1/extra-single-image", {
      image: $("ex-picture").src, upscaler_1: $("ex-upscaler-1").value, upscaling_resize: parseFloat($("ex-scale").value),
      upscaler_2: $("ex-upscaler-2").value, extras_upscaler_2_visibility: parseFloat($("ex-visibility").value),
    });
    const info = new DOMParser().parseFromString(r.html_info, "text/html").body.textContent;  // A1111's <p>…</p>
    addImage(r.image, info);
    $("ex-status").textContent = "done";
  } catch (e) {
    $("ex-status").textContent = "error: " + e.message;
  } finally {
    $("ex-run").disabled = false;
  }
};

function drawPicture() {
  const ctx = $("i2i-canvas").getContext("2d");
  ctx.globalAlpha = 1;
  ctx.drawImage(i2i.image, 0, 0);
  ctx.globalAlpha = 0.5;  // the mask in translucent red over the picture
  ctx.drawImage(i2i.strokes, 0, 0);
  ctx.globalAlpha = 1;
}

function canvasPoint(ev) {
  const c = $("i2i-canvas"), box = c.getBoundingClientRect();
  return [(ev.clientX - box.left) * c.width / box.width, (ev.clientY - box.top) * c.height / box.height];
}

function paintTo(point) {
  const ctx = i2i.strokes.getContext("2d");
  ctx.strokeStyle = ctx.fillStyle = "rgb(255, 0, 0)";
  ctx.lineWidth = Math.max(1, parseFloat($("i2i-brush").value) || 12);
  ctx.lineCap = ctx.lineJoin = "round";
  ctx.beginPath();
  ctx.moveTo(...(i2i.last || point));
  ctx.lineTo(...point);
  ctx.stroke();
  i2i.last = point;
  i2i.painted = true;
  drawPicture();
}

$("i2i-canvas").onpointerdown = (ev) => {
  ev.preventDefault();
  $("i2i-canvas").setPointerCapture(ev.pointerId);
  i2i.last = null;
  paintTo(canvasPoint(ev));
};
$("i2i-canvas").onpointermove = (ev) => { if (i2i.last) paintTo(canvasPoint(ev)); };
$("i2i-canvas").onpointerup = $("i2i-canvas").onpointercancel = () => { i2i.last = null; };
$("i2i-clear").onclick = () => {
  if (!i2i.strokes) return;
  i2i.strokes.getContext("2d").clearRect(0, 0, i2i.strokes.width, i2i.strokes.height);
  i2i.painted = false;
  drawPicture();
};

$("i2i-generate").onclick = async () => {
  if (!i2i.dataUrl) { $("i2i-status").textContent = "choose a picture first"; return; }
  const req = {
    ...generationRequest(), init_images: [i2i.dataUrl], denoising_strength: parseFloat($("i2i-denoise").value),
  };
  if (i2i.painted) {
    Object.assign(req, {
      mask: i2i.strokes.toDataURL("image/png"), mask_blur: intOrNull("i2i-blur") ?? 4,
      inpainting_fill: parseInt($("i2i-fill").value, 10), inpaint_full_res: $("i2i-area").value === "masked",
      inpaint_full_res_padding: intOrNull("i2i-padding") ?? 32,
    });
  }
  await runGeneration("/sdapi/v1/img2img", await addControlNet(req), $("i2i-generate"), $("i2i-status"));
};

let pngParameters = null; // the parsed parameters of the last PNG read, for "Send to text to image"

async function pngInfo(file) {
  try {
    const r = await api("POST", "/sdapi/v1/png-info", { image: await readBase64(file) });
    $("pnginfo").textContent = r.info || "(no generation parameters in this image)";
    pngParameters = r.info ? r.parameters : null;
    $("png-send").hidden = !pngParameters;
  } catch (e) { $("pnginfo").textContent = "error: " + e.message; }
}

// A1111's "Send to txt2img": the generation form takes the picture's settings (those it has fields for)
function selectByText(select, text) {
  const o = [...select.options].find((x) => x.value === text || x.textContent === text);
  if (o) select.value = o.value;
}
$("png-send").onclick = () => {
  const p = pngParameters;
  if (!p) return;
  const set = (id, key) => { if (p[key] !== undefined) $(id).value = p[key]; };
  $("prompt").value = p["Prompt"] || "";
  $("negative").value = p["Negative prompt"] || "";
  set("steps", "Steps"); set("cfg", "CFG scale"); set("seed", "Seed");
  set("width", "Size-1"); set("height", "Size-2");
  if (p["Sampler"]) selectByText($("sampler"), p["Sampler"]);
  if (p["Schedule type"]) selectByText($("scheduler"), p["Schedule type"]);
  const hires = p["Denoising strength"] !== undefined && (p["Hires upscale"] !== undefined || p["Hires upscaler"] !== undefined);
  $("hr-enabled").checked = hires;
  if (hires) {
    set("hr-scale", "Hires upscale"); set("hr-steps", "Hires steps"); set("hr-denoise", "Denoising strength");
    if (p["Hires upscaler"]) selectByText($("hr-upscaler"), p["Hires upscaler"]);
  }
  $("tiling").checked = p["Tiling"] === "True";
  $("rf-enabled").checked = p["Refiner"] !== undefined;
  if (p["Refiner"]) {  // "name [hash]": the model listed under that title, else by its name
    const name = p["Refiner"].replace(/ \[[0-9a-f]+\]$/, "");
    const o = [...$("rf-checkpoint").options].find((x) => x.value === p["Refiner"] || x.textContent === name);
    if (o) $("rf-checkpoint").value = o.value;
    $("rf-switch").value = p["Refiner switch at"] ?? 0;
  }
  $("txt2img").scrollIntoView({ behavior: "smooth" });
};
const drop = $("dropzone");
drop.ondragover = (e) => { e.preventDefault(); drop.classList.add("over"); };
drop.ondragleave = () => drop.classList.remove("over");
drop.ondrop = (e) => { e.preventDefault(); drop.classList.remove("over"); if (e.dataTransfer.files[0]) pngInfo(e.dataTransfer.files[0]); };
$("png-file").onchange = () => { if ($("png-file").files[0]) pngInfo($("png-file").files[0]); };

// ---- personalize ---------------------------------------------------------------------------------------
$("subject-files").onchange = () => {
  const t = $("thumbs"); t.textContent = "";
  for (const f of $("subject-files").files) {
    const img = document.createElement("img"); img.src = URL.createObjectURL(f); img.alt = ""; t.appendChild(img);
  }
};
$("train-method").onchange = () => {
  $("train-rank").disabled = $("train-method").value !== "lora";
  $("train-algo").disabled = $("train-method").value !== "lora";
  $("train-initializer").disabled = $("train-method").value !== "textual-inversion";
};
$("train-method").onchange();

async function uploadFiles(files) {
  const form = new FormData();
  for (const f of files) form.append("files", f);
  return (await api("POST", "/booth/v1/uploads", form)).id;
}

$("train-form").onsubmit = async (ev) => {
  ev.preventDefault();
  const files = $("subject-files").files;
  if (files.length < 3 || files.length > 20) { $("train-status").textContent = "choose 3 to 20 images"; return; }
  $("train-start").disabled = true;
  $("try-it").hidden = true;
  try {
    $("train-status").textContent = "uploading…";
    const req = {
      method: $("train-method").value, upload: await uploadFiles(files),
      instance_prompt: $("instance-prompt").value, steps: intOrNull("train-steps") || 400,
    };
    if ($("train-name").value) req.name = $("train-name").value;
    if ($("class-prompt").value) req.class_prompt = $("class-prompt").value;
    if ($("train-lr").value) req.lr = parseFloat($("train-lr").value);
    if ($("train-rank").value && req.method === "lora") req.rank = intOrNull("train-rank");
    if (req.method === "lora") req.options = { lora: { algo: $("train-algo").value } };  // LoRA, LoHa or LoKr
    if ($("class-files").files.length) req.class_upload = await uploadFiles($("class-files").files);
    if ($("prior").checked) req.prior_preservation = true;
    if (req.method === "textual-inversion") { // needs a starting word: the field, else the prompt's last word
      const words = ($("class-prompt").value || req.instance_prompt).trim().split(/\s+/);
      req.initializer = $("train-initializer").value.trim() || words[words.length - 1];
    }
    const every = intOrNull("train-preview-every");
    if (every) req.preview_every = every;
    const r = await api("POST", "/booth/v1/train", req);
    training = r.job.id;
    previewEvery = every || 0;
    previewShown = null;
    $("train-preview-box").hidden = true;
    $("train-status").textContent = "queued";
    updateJob(r.job);
  } catch (e) {
    $("train-status").textContent = "error: " + e.message;
    $("train-start").disabled = false;
  }
};

// the latest validation image: fetched when a preview step has passed, and at the end
function refreshPreview(job) {
  if (!previewEvery) return;
  const step = job.status === "done" ? job.total : Math.floor((job.step || 0) / previewEvery) * previewEvery;
  if (!step || step === previewShown) return;
  previewShown = step;
  const img = $("train-preview");
  img.onload = () => {
    $("train-preview-box").hidden = false;
    $("train-preview-caption").textContent = `preview at step ${step}`;
  };
  img.onerror = () => { if (previewShown === step) previewShown = null; }; // not written yet: retry later
  img.src = `/booth/v1/jobs/${job.id}/files/preview?step=${step}`;
}

function tryIt(result) {
  if (result.model) {
    return { label: `Try it: use model ${result.model}`, run: () => selectModel(result.model).catch((e) => alert(e.message)) };
  }
  if (result.prompt) {
    return { label: `Try it: ${result.prompt}`, run: () => insertPrompt(result.prompt) };
  }
  return null;
}

function showTraining(job) {
  if (job.status === "running" || job.status === "done") refreshPreview(job);
  const m = job.metrics || {};
  $("train-bar").style.width = `${Math.round((job.progress || 0) * 100)}%`;
  $("train-status").textContent = job.status + (job.message ? ` — ${job.message}` : "");
  const loss = m.loss != null ? m.loss.toFixed(4) : "–";
  $("train-info").textContent = job.total
    ? `step ${job.step || 0}/${job.total} · loss ${loss} · ETA ${fmtSeconds(job.eta)}` : "";
  if (["done", "failed", "cancelled"].includes(job.status)) {
    $("train-start").disabled = false;
    if (job.status === "failed" && job.error) $("train-status").textContent = "failed: " + job.error.detail;
    if (job.status === "done" && job.result) {
      const use = tryIt(job.result);
      $("try-it").hidden = !use;
      if (use) {
        $("try-it").textContent = use.label;
        $("try-it").onclick = async () => { await use.run(); $("prompt").scrollIntoView({ behavior: "smooth" }); $("prompt").focus(); };
      }
      if (job.result.method === "custom-diffusion") $("train-status").textContent = "done — download it below (not served yet)";
      loadLoras();
      if (job.result.model) loadModels();
    }
  }
}

// ---- jobs ----------------------------------------------------------------------------------------------
function updateJob(job) {
  jobs.set(job.id, { ...(jobs.get(job.id) || {}), ...job });
  if (job.id === training) showTraining(job);
  renderJobs();
}

// running first, then the queued ones in the order they will run, then the finished ones, newest first
function jobRank(job) { return job.status === "running" ? 0 : job.status === "queued" ? 1 : 2; }
function jobOrder(a, b) {
  return jobRank(a) - jobRank(b) || (jobRank(a) === 1
    ? (b.priority - a.priority) || (a.order - b.order) || (a.created - b.created)
    : b.created - a.created);
}

function jobButton(label, cls, title, onclick) {
  const b = document.createElement("button");
  b.type = "button"; b.textContent = label; b.className = cls; b.title = title; b.onclick = onclick;
  return b;
}

function moveJob(job, to) {
  api("POST", `/booth/v1/jobs/${job.id}/move`, { to }).then((r) => updateJob(r.job))
    .catch((e) => { $("queue-info").textContent = e.message; });
}

function renderJobs() {
  const body = document.querySelector("#jobs tbody");
  body.textContent = "";
  const list = [...jobs.values()].sort(jobOrder).slice(0, 30);
  const queued = list.filter((j) => j.status === "queued");
  $("queue-info").textContent = queued.length ? `${queued.length} waiting` : "";
  for (const job of list) {
    const tr = document.createElement("tr");
    tr.dataset.job = job.id;
    const kind = job.kind === "train" && job.result ? `train · ${job.result.name}` : job.kind;
    const place = queued.indexOf(job);
    const status = place >= 0 ? `queued #${place + 1}` : job.status;
    const pct = job.status === "running" && job.total ? `${job.step || 0}/${job.total}` +
      (job.eta != null ? ` · ${fmtSeconds(job.eta)} left` : "") : job.status === "done" ? "100%" : "";
    for (const [text, cls] of [[kind, ""], [status, "status-" + job.status], [pct, ""]]) {
      const td = document.createElement("td"); td.textContent = text; if (cls) td.className = cls; tr.appendChild(td);
    }
    const td = document.createElement("td");
    if (job.status === "queued" && queued.length > 1) {
      if (place > 0) {
        td.appendChild(jobButton("Top", "move-top", "run it next", () => moveJob(job, "top")));
        td.appendChild(jobButton("↑", "move-up", "one place earlier", () => moveJob(job, "up")));
      }
      if (place < queued.length - 1) td.appendChild(jobButton("↓", "move-down", "one place later", () => moveJob(job, "down")));
    }
    if (job.status === "queued" || job.status === "running") {
      td.appendChild(jobButton("Cancel", "cancel", "", () =>
        api("POST", `/booth/v1/jobs/${job.id}/cancel`).then((r) => updateJob(r.job)).catch(() => {})));
    } else if (job.kind === "train" && job.status === "done" && job.result && job.result.files) {
      const kind = job.result.files.lora ? "lora" : Object.keys(job.result.files)[0];
      const a = document.createElement("a");
      a.href = `/booth/v1/jobs/${job.id}/files/${kind}`; a.textContent = "download";
      td.appendChild(a);
    }
    tr.appendChild(td);
    body.appendChild(tr);
  }
}

function connect() {
  const es = new EventSource("/booth/v1/events");
  es.addEventListener("hello", (e) => {
    $("conn").textContent = "live"; $("conn").classList.add("on");
    for (const job of JSON.parse(e.data).jobs) updateJob(job);
  });
  for (const kind of ["queued", "moved", "started", "progress", "done", "failed", "cancelled"]) {
    es.addEventListener(kind, (e) => updateJob(JSON.parse(e.data)));
  }
  es.onerror = () => { $("conn").textContent = "reconnecting"; $("conn").classList.remove("on"); };
}

// pause / resume the queue: jobs are still accepted while paused, none starts
let queuePaused = false;
function showPaused(paused) {
  queuePaused = paused;
  $("queue-pause").textContent = paused ? "Resume queue" : "Pause queue";
  $("queue-pause").classList.toggle("primary", paused);
}
$("queue-pause").onclick = () => api("POST", `/booth/v1/queue/${queuePaused ? "resume" : "pause"}`)
  .then((r) => showPaused(r.paused)).catch((e) => { $("queue-info").textContent = e.message; });
api("GET", "/booth/v1/queue?limit=1").then((q) => showPaused(q.paused)).catch(() => {});

loadLists().catch((e) => { $("gen-status").textContent = "cannot reach the server: " + e.message; });
connect();
