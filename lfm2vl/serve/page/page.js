// lfm2vl's chat page: pictures and a question go to the server's own /v1/chat/completions as one streamed request
// (the whole conversation each turn, as OpenAI clients send it); the answer is shown as it arrives.
// Everything the model or a user wrote is put in the page as text (textContent), never parsed as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY_STORE = "lfm2vl.apiKey";  // sessionStorage: kept for this tab only
const IMAGE_TYPES = ["image/png", "image/jpeg", "image/webp", "image/gif"];  // what the server decodes

const state = {
  config: {max_images: 8, max_image_bytes: 20 * 2 ** 20, min_image_tokens: 1, max_image_tokens: 256,
           default_max_tokens: 1024, api_key_required: false},
  model: null,
  history: [],      // OpenAI messages sent with the next request
  attachments: [],  // {file, url} waiting for the next message
  controller: null, // the running request's AbortController
  turn: 0,          // bumped by New chat: an answer of an older chat is dropped
};

// ---- server ------------------------------------------------------------------------------------------------
function headers() {
  const h = {"Content-Type": "application/json"};
  const key = sessionStorage.getItem(KEY_STORE);
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

async function errorText(resp) {
  let message = resp.statusText;
  try {
    const body = await resp.json();
    message = (body.error && body.error.message) || JSON.stringify(body);
  } catch (e) { /* not JSON: keep the status text */ }
  return `The server refused the request (${resp.status}): ${message}`;
}

function askKey(message) {
  return new Promise((resolve) => {
    const dialog = $("key-dialog");
    $("key-message").textContent = message;
    $("key").value = "";
    $("key-form").onsubmit = (ev) => {
      ev.preventDefault();
      const key = $("key").value.trim();
      if (!key) return;
      sessionStorage.setItem(KEY_STORE, key);
      dialog.close();
      resolve();
    };
    dialog.addEventListener("cancel", (ev) => ev.preventDefault(), {once: true});  // Escape: the key is needed
    dialog.showModal();
    $("key").focus();
  });
}

async function refusedKey() {
  const had = sessionStorage.getItem(KEY_STORE);
  sessionStorage.removeItem(KEY_STORE);
  await askKey(had ? "The server did not accept that key. Enter its API key:" : "This server needs an API key:");
}

async function loadConfig() {
  try {
    const resp = await fetch("/ui/config.json");
    if (resp.ok) Object.assign(state.config, await resp.json());
  } catch (e) { /* the defaults above stand; the server's own limits still apply */ }
  const c = state.config;
  $("max-image-tokens").max = String(c.max_image_tokens);
  $("max-image-tokens").placeholder = String(c.max_image_tokens);
  $("max-tokens").placeholder = String(c.default_max_tokens);
}

async function loadModel() {
  for (;;) {
    let resp;
    try {
      resp = await fetch("/v1/models", {headers: headers()});
    } catch (e) {
      showError("The server cannot be reached: " + e.message);
      return;
    }
    if (resp.status === 401) { await refusedKey(); continue; }
    if (!resp.ok) { showError(await errorText(resp)); return; }
    const body = await resp.json();
    state.model = body.data[0].id;
    $("model").textContent = state.model;
    document.title = state.model + " · lfm2vl";
    return;
  }
}

// ---- attachments ---------------------------------------------------------------------------------------------
function showError(text) {
  $("error").textContent = text || "";
  $("error").hidden = !text;
}

function megabytes(n) { return (n / 2 ** 20).toFixed(1) + " MB"; }

function imagesInHistory() {
  let n = 0;
  for (const m of state.history) if (Array.isArray(m.content)) n += m.content.filter((p) => p.type === "image_url").length;
  return n;
}

function addFiles(files) {
  const problems = [];
  for (const file of files) {
    const name = file.name || "pasted image";
    if (!IMAGE_TYPES.includes(file.type)) {
      problems.push(`${name} is not a PNG, JPEG, WebP or GIF image.`);
      continue;
    }
    if (file.size > state.config.max_image_bytes) {
      problems.push(`${name} is ${megabytes(file.size)}; the server takes at most ${megabytes(state.config.max_image_bytes)} per image.`);
      continue;
    }
    if (imagesInHistory() + state.attachments.length >= state.config.max_images) {
      problems.push(`The server takes at most ${state.config.max_images} images per conversation request; start a New chat for more.`);
      break;
    }
    state.attachments.push({file, url: URL.createObjectURL(file)});
  }
  showError(problems.join(" "));
  renderAttachments();
}

function renderAttachments() {
  const box = $("attachments");
  box.replaceChildren();
  state.attachments.forEach((a, i) => {
    const item = document.createElement("div");
    item.className = "attachment";
    const img = document.createElement("img");
    img.src = a.url;
    img.alt = a.file.name || "pasted image";
    img.title = a.file.name || "pasted image";
    const remove = document.createElement("button");
    remove.type = "button";
    remove.textContent = "×";
    remove.setAttribute("aria-label", "Remove " + (a.file.name || "pasted image"));
    remove.addEventListener("click", () => {
      URL.revokeObjectURL(a.url);
      state.attachments.splice(i, 1);
      renderAttachments();
    });
    item.append(img, remove);
    box.append(item);
  });
}

function readDataUrl(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

// ---- conversation --------------------------------------------------------------------------------------------
function bubble(role) {
  $("empty").hidden = true;
  const box = document.createElement("div");
  box.className = "msg " + role;
  const thumbs = document.createElement("div");
  thumbs.className = "thumbs";
  const text = document.createElement("div");
  text.className = "text";
  const figures = document.createElement("div");
  figures.className = "figures";
  box.append(thumbs, text, figures);
  $("messages").append(box);
  return {box, thumbs, text, figures};
}

function scrollDown() { $("messages").scrollTop = $("messages").scrollHeight; }

function figuresLine(usage, timings, finish) {
  const parts = [];
  if (usage) {
    const details = usage.prompt_tokens_details || {};
    let prompt = `${usage.prompt_tokens} prompt tokens`;
    if (details.image_tokens) prompt += ` (${details.image_tokens} image)`;
    parts.push(prompt, `${usage.completion_tokens} answer tokens`);
  }
  if (timings) {
    parts.push(`first token ${(timings.ttft_ms / 1000).toFixed(2)} s`);
    if (timings.predicted_per_second) parts.push(`${timings.predicted_per_second.toFixed(1)} tokens/s`);
  }
  if (finish === "length") parts.push("cut at max tokens");
  return parts.join(" · ");
}

function knobs() {
  const out = {do_image_splitting: $("splitting").checked};
  const temperature = parseFloat($("temperature").value);
  if (Number.isFinite(temperature)) out.temperature = temperature;
  const maxTokens = parseInt($("max-tokens").value, 10);
  if (maxTokens > 0) out.max_tokens = maxTokens;
  const maxImage = parseInt($("max-image-tokens").value, 10);
  if (maxImage > 0) {
    out.max_image_tokens = maxImage;
    out.min_image_tokens = Math.min(maxImage, state.config.min_image_tokens);
  }
  return out;
}

function setBusy(busy) {
  $("send").hidden = busy;
  $("stop").hidden = !busy;
}

async function send() {
  if (state.controller || !state.model) return;
  const text = $("prompt").value.trim();
  if (!text && !state.attachments.length) return;
  showError("");
  const attached = state.attachments;
  let urls;
  try {
    urls = await Promise.all(attached.map((a) => readDataUrl(a.file)));
  } catch (e) {
    showError("An image could not be read: " + e.message);
    return;
  }
  const content = urls.map((url) => ({type: "image_url", image_url: {url}}));
  content.push({type: "text", text});
  const user = bubble("user");
  attached.forEach((a) => {
    const img = document.createElement("img");
    img.src = a.url;
    img.alt = a.file.name || "pasted image";
    user.thumbs.append(img);
  });
  user.text.textContent = text;
  state.attachments = [];
  renderAttachments();
  $("prompt").value = "";
  state.history.push({role: "user", content});
  await answer(bubble("assistant"), {text, attached});
}

async function answer(view, sent) {
  const controller = new AbortController();
  const turn = state.turn;
  state.controller = controller;
  setBusy(true);
  scrollDown();
  const body = {model: state.model, messages: state.history, stream: true, stream_options: {include_usage: true},
                ...knobs()};
  let text = "", usage = null, timings = null, finish = null;
  try {
    const resp = await fetch("/v1/chat/completions", {method: "POST", headers: headers(), body: JSON.stringify(body),
                                                      signal: controller.signal});
    if (!resp.ok) {
      const message = resp.status === 401 ? "The server needs an API key; enter it and send again." : await errorText(resp);
      refuse(view, sent, message);
      if (resp.status === 401) await refusedKey();
      return;
    }
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, {stream: true});
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data: ") || line === "data: [DONE]") continue;
          const chunk = JSON.parse(line.slice(6));
          if (chunk.error) throw new Error(chunk.error.message);
          if (chunk.usage) usage = chunk.usage;
          if (chunk.timings) timings = chunk.timings;
          const choice = chunk.choices && chunk.choices[0];
          if (!choice) continue;
          if (choice.delta && choice.delta.content) {
            text += choice.delta.content;
            view.text.textContent = text;
            scrollDown();
          }
          if (choice.finish_reason) finish = choice.finish_reason;
        }
      }
    }
    if (turn !== state.turn) return;
    state.history.push({role: "assistant", content: text});
    view.figures.textContent = figuresLine(usage, timings, finish);
  } catch (e) {
    if (turn !== state.turn) return;
    if (e.name === "AbortError") {
      state.history.push({role: "assistant", content: text});
      view.figures.textContent = "Stopped.";
    } else {
      state.history.push({role: "assistant", content: text});
      view.figures.classList.add("bad");
      view.figures.textContent = "The answer broke off: " + e.message;
    }
  } finally {
    if (state.controller === controller) state.controller = null;
    setBusy(false);
    scrollDown();
  }
}

function refuse(view, sent, message) {
  // the turn never happened: it leaves the conversation and its text and images go back to the composer
  state.history.pop();
  view.box.previousElementSibling.remove();
  view.box.remove();
  if (!$("messages").querySelector(".msg")) $("empty").hidden = false;
  $("prompt").value = sent.text;
  state.attachments = sent.attached.concat(state.attachments);
  renderAttachments();
  showError(message);
}

function newChat() {
  if (state.controller) state.controller.abort();
  state.turn += 1;
  state.history = [];
  for (const box of [...$("messages").querySelectorAll(".msg")]) box.remove();
  $("empty").hidden = false;
  showError("");
  $("prompt").focus();
}

// ---- events --------------------------------------------------------------------------------------------------
function hasFiles(ev) { return ev.dataTransfer && [...ev.dataTransfer.types].includes("Files"); }

function wire() {
  $("composer").addEventListener("submit", (ev) => { ev.preventDefault(); send(); });
  $("prompt").addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) {
      ev.preventDefault();
      send();
    }
  });
  $("stop").addEventListener("click", () => { if (state.controller) state.controller.abort(); });
  $("new-chat").addEventListener("click", newChat);
  $("attach").addEventListener("click", () => $("file").click());
  $("file").addEventListener("change", () => { addFiles([...$("file").files]); $("file").value = ""; });
  document.addEventListener("paste", (ev) => {
    const files = [...(ev.clipboardData ? ev.clipboardData.files : [])];
    if (files.length) { ev.preventDefault(); addFiles(files); }
  });
  let depth = 0;  // dragenter/dragleave fire for every child element crossed
  document.addEventListener("dragenter", (ev) => { if (hasFiles(ev)) { depth += 1; $("drop").hidden = false; } });
  document.addEventListener("dragleave", (ev) => { if (hasFiles(ev) && --depth <= 0) { depth = 0; $("drop").hidden = true; } });
  document.addEventListener("dragover", (ev) => { if (hasFiles(ev)) ev.preventDefault(); });
  document.addEventListener("drop", (ev) => {
    if (!hasFiles(ev)) return;
    ev.preventDefault();
    depth = 0;
    $("drop").hidden = true;
    addFiles([...ev.dataTransfer.files]);
  });
}

wire();
loadConfig().then(loadModel).then(() => $("prompt").focus());
